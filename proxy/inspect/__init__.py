"""Inspection: statement records in, plain rows and counters out (fingerprints, statistics, EXPLAIN samples,
index advice, N+1 bursts, lock holds); see ``proxy.inspect.consumer`` for the one interface."""

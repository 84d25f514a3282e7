"""Export: what users read, built from the rows of inspect and the pools (Prometheus metrics, the HTTP
server and its JSON API)."""

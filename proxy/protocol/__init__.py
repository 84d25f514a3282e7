"""Sans-IO PostgreSQL protocol: framing, codecs, the relay core, auth exchanges, SQL text; imports nothing else of proxy."""

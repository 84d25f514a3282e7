"""The admin console: the virtual databases ``pgscope`` and ``pgbouncer`` answered by the proxy itself (docs/admin.md)."""

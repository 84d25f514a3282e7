"""The admin console: virtual databases pgscope and pgbouncer, answered by the proxy (docs/admin.md)."""

"""One client's life: login, the server it holds, the pooling rules, its end (see docs/architecture.md)."""

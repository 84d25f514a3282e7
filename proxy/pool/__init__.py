"""Server connections: per (database, user) pools, upstream login, reset, reaping, database fences."""

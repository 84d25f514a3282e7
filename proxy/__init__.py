"""pgscope: a query-aware PostgreSQL connection proxy."""

__version__ = "0.1.0"

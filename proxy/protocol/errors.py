"""SQLSTATE codes the proxy itself raises, and a typed error for them."""

from __future__ import annotations

# class 08 — connection exception
CONNECTION_FAILURE = "08006"
PROTOCOL_VIOLATION = "08P01"
SQLCLIENT_UNABLE_TO_ESTABLISH = "08001"
# class 28 — invalid authorization specification
INVALID_AUTHORIZATION = "28000"
INVALID_PASSWORD = "28P01"
# class 53 — insufficient resources
TOO_MANY_CONNECTIONS = "53300"
# class 57 — operator intervention
ADMIN_SHUTDOWN = "57P01"
CANNOT_CONNECT_NOW = "57P03"
# class 25 — invalid transaction state
IDLE_IN_TRANSACTION_TIMEOUT = "25P03"
IDLE_SESSION_TIMEOUT = "57P05"
# class 0A — feature not supported
FEATURE_NOT_SUPPORTED = "0A000"
# class XX
INTERNAL_ERROR = "XX000"


class PgError(Exception):
    """An error the proxy reports to a client as an ErrorResponse."""

    def __init__(self, sqlstate: str, message: str, *, severity: str = "FATAL",
                 detail: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.severity = severity
        self.detail = detail
        self.hint = hint


class ProtocolViolation(PgError):
    def __init__(self, message: str) -> None:
        super().__init__(PROTOCOL_VIOLATION, message)

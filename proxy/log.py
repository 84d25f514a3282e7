"""structlog set-up: JSON lines by default, a console renderer on request, live level changes.

Nothing secret reaches the output: values under keys that name a secret are
masked, and passwords inside connection URLs are replaced, before rendering.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_SECRET_KEYS = frozenset(("password", "passwd", "secret", "token", "upstream_password", "parameters"))
_URL_PASSWORD = re.compile(r"(postgres(?:ql)?://[^:/@\s]*):([^@\s]*)@")

_state = {"level": logging.INFO, "allow_parameters": False}


def _redact(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in event.items():
        if key in _SECRET_KEYS:
            if key == "parameters" and _state["allow_parameters"]:
                continue
            event[key] = "***"
        elif isinstance(value, str) and "://" in value:
            event[key] = _URL_PASSWORD.sub(r"\1:***@", value)
    return event


def _level_filter(_logger: Any, name: str, event: dict[str, Any]) -> dict[str, Any]:
    if LEVELS.get(name, logging.INFO) < _state["level"]:
        raise structlog.DropEvent
    return event


class _StderrLogger(structlog.PrintLogger):
    """Writes to whatever sys.stderr is at the time (it may be swapped, e.g. by test capture)."""

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg


def _stderr_logger(*_args: Any) -> _StderrLogger:
    return _StderrLogger(sys.stderr)


def configure_logging(fmt: str = "json", level: str = "info", allow_parameters: bool = False) -> None:
    _state["level"] = LEVELS.get(level, logging.INFO)
    _state["allow_parameters"] = allow_parameters
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            _level_filter,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )


def set_level(level: str) -> None:
    """Change the level live (SIGHUP)."""
    _state["level"] = LEVELS.get(level, logging.INFO)


def allow_parameters(allowed: bool) -> None:
    _state["allow_parameters"] = allowed


def get_logger(name: str = "pgscope") -> Any:
    return structlog.get_logger(name).bind(logger=name)


configure_logging()  # a sane default before the CLI has read its settings

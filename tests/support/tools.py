"""External tools the tests need: found, or skipped locally and failed in CI."""

from __future__ import annotations

import glob
import os
import shutil
import socket

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def missing(what: str) -> None:
    if in_ci():
        pytest.fail(f"{what} is required in CI (.ci/run installs it)")
    pytest.skip(f"{what} is not installed")


def find(name: str) -> str | None:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if path is None:
        for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
            if os.access(os.path.join(d, name), os.X_OK):
                return os.path.join(d, name)
    return path


def require(name: str) -> str:
    path = find(name)
    if path is None:
        missing(name)
    return path  # type: ignore[return-value]


def require_hypopg(pg) -> None:
    if not pg.has_hypopg:
        missing("the HypoPG extension")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

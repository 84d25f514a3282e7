"""The relay core's two implementations, for tests that run on both.

The pure-Python reference (``PyFramer``, ``PyRelay``) and the compiled twin
(proxy/protocol/_core.pyx), imported directly so that both are tested whatever
``PGSCOPE_NO_EXTENSIONS`` says; the compiled one's cases skip when it is not
built (tests/test_relay_twins.py fails instead under CI=true).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

from proxy.protocol.framing import PyFramer
from proxy.protocol.relay import PyRelay

compiled: ModuleType | None
try:
    compiled = importlib.import_module("proxy.protocol._core")
    missing = ""
except ImportError as e:
    compiled = None
    missing = f"the compiled relay core is not built ({e}): pip install -e ."


def _both(reference: type, name: str) -> list:
    twin = getattr(compiled, name) if compiled is not None else None
    return [pytest.param(reference, id="py"),
            pytest.param(twin, id="compiled", marks=pytest.mark.skipif(compiled is None, reason=missing))]


FRAMERS = _both(PyFramer, "Framer")
RELAYS = _both(PyRelay, "Relay")

"""Which relay core runs: the compiled twin (``_core``, from _core.pyx) or the pure-Python reference.

``core`` is the compiled module, or None when ``PGSCOPE_NO_EXTENSIONS`` is set
(to anything but "" or "0") or when the extension was not built (no C compiler
or Cython when pgscope was installed); only the latter warns, once, when this
module is first imported (at start-up).  framing.py and relay.py take their
``Framer``, ``RequestLedger`` and ``Relay`` from it; both implementations give
the same bytes, records and state (tests/test_relay_twins.py).
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import Any

ENV_SWITCH = "PGSCOPE_NO_EXTENSIONS"


class ExtensionWarning(RuntimeWarning):
    """The compiled relay core could not be loaded: the pure-Python one runs instead."""


def disabled(env: dict[str, str] | os._Environ = os.environ) -> bool:
    """Whether the environment asks for the pure-Python core."""
    return env.get(ENV_SWITCH, "") not in ("", "0")


def _load() -> tuple[ModuleType | None, str]:
    if disabled():
        return None, f"{ENV_SWITCH} is set"
    try:
        from proxy.protocol import _core
    except ImportError as e:
        reason = f"the compiled relay core is not built ({e})"
        warnings.warn(f"pgscope: {reason}; the pure-Python relay runs instead (same behaviour, slower). "
                      "Reinstall with a C compiler at hand to build it (pip install -e .).",
                      ExtensionWarning, stacklevel=3)
        return None, reason
    return _core, ""


core, why_not = _load()  # why_not: why the pure-Python core runs ("" when compiled)
COMPILED = core is not None


def twins(module: str, what: str, **references: Any) -> tuple[Any, ...]:
    """The compiled twins of ``references`` (name -> the pure-Python reference) from ``module``,
    in the order given, or the references themselves: when the relay core does not run compiled
    (``PGSCOPE_NO_EXTENSIONS``, or no build: warned above), or when ``module`` alone is missing
    (one ExtensionWarning naming ``what``)."""
    if not COMPILED:
        return tuple(references.values())
    try:
        compiled = importlib.import_module(module)
    except ImportError as e:
        warnings.warn(f"pgscope: the compiled {what} is not built ({e}); the pure-Python one runs instead "
                      "(same behaviour, slower)", ExtensionWarning, stacklevel=3)
        return tuple(references.values())
    return tuple(getattr(compiled, name) for name in references)

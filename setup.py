"""Builds the compiled relay, pool and session cores (proxy/protocol/_core.pyx, proxy/pool/_hot.pyx,
proxy/session/_hot.pyx) and the inspector's slice passes (proxy/inspect/_slices.pyx); the package's
metadata is in pyproject.toml.

The extension is optional.  Without Cython or a working C compiler it is left
out with a warning, and pgscope runs its pure-Python relay (the same
behaviour, slower; proxy.protocol.native warns once at start-up).
``PGSCOPE_NO_EXTENSIONS=1`` at install time leaves it out on purpose.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCES = {"proxy.protocol._core": "proxy/protocol/_core.pyx", "proxy.pool._hot": "proxy/pool/_hot.pyx",
           "proxy.session._hot": "proxy/session/_hot.pyx", "proxy.inspect._slices": "proxy/inspect/_slices.pyx"}


def _warn(what: str, error: object) -> None:
    print(f"WARNING: pgscope: {what} ({error}); the pure-Python relay will run instead.", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """build_ext that leaves out an extension it cannot build instead of failing the install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # no compiler at all (DistutilsPlatformError and the like)
            _warn("the compiled relay core could not be built", e)
            self.extensions = []

    def build_extensions(self) -> None:
        for ext in list(self.extensions):
            try:
                self.build_extension(ext)
            except Exception as e:  # CompileError, LinkError, DistutilsExecError: a missing or failing compiler
                _warn(f"{ext.name} could not be built", e)
                self.extensions.remove(ext)


def extensions() -> list[Extension]:
    if os.environ.get("PGSCOPE_NO_EXTENSIONS", "") not in ("", "0"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError as e:
        _warn("Cython is missing", e)
        return []
    return cythonize([Extension(name, [path]) for name, path in SOURCES.items()], quiet=True,
                     compiler_directives={"language_level": 3})


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})

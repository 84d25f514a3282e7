"""The process: the event loop, signals (SIGTERM/SIGINT drain, a second one forces; SIGHUP
reloads), garbage-collector tuning, the open-files limit; ``pgscope run`` ends up here."""

from __future__ import annotations

import asyncio
import ipaddress
import resource
import signal
from typing import Any, Awaitable, Callable

from proxy.listener import Proxy
from proxy.log import configure_logging, get_logger


def tune_gc() -> None:
    """Fewer, cheaper garbage collections for a process that allocates per message.

    Everything alive after start-up (modules, pglast, settings) moves to the
    permanent generation, so full collections no longer walk it, and the
    young generation is collected every 20000 allocations instead of 700.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(20000, 20, 20)


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the open-files soft limit to the hard limit; return (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


async def serve(settings: Any, config_file: str | None = None,
                overrides: dict[str, Any] | None = None,
                main: Callable[[Proxy], Awaitable[int]] | None = None) -> int:
    """Run the proxy until SIGTERM/SIGINT (drain; a second one forces).

    ``main(proxy)``, when given, runs on the proxy's loop once it listens (the
    demo's driver): when it returns, the proxy closes and its result is the
    exit code; a signal before that cancels it (and the exit code is 0, as for
    a signal without ``main``).
    """
    raise_nofile_limit()
    proxy = Proxy(settings, config_file)
    proxy.overrides = dict(overrides or {})
    await proxy.start()
    tune_gc()
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    signals_seen = 0

    def on_stop(signame: str) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            proxy.log.info("signal", signal=signame, action="drain")

            async def _drain() -> None:
                await proxy.drain(proxy.settings.shutdown_timeout)
                done.set()

            loop.create_task(_drain())
        else:
            proxy.log.info("signal", signal=signame, action="force")

            async def _force() -> None:
                await proxy.close()
                done.set()

            loop.create_task(_force())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig.name)
    loop.add_signal_handler(signal.SIGHUP, proxy.reload)
    proxy.on_shutdown = lambda: on_stop("SHUTDOWN")  # the admin console's SHUTDOWN: as SIGTERM
    result = 0
    main_task: asyncio.Task | None = None
    if main is not None:
        async def _main() -> None:
            nonlocal result
            try:
                result = await main(proxy)
            finally:
                if not proxy.draining:
                    await proxy.close()
                done.set()

        main_task = loop.create_task(_main())
    await done.wait()
    if main_task is not None:
        if not main_task.done():
            main_task.cancel()
        await asyncio.gather(main_task, return_exceptions=True)
        if not main_task.cancelled() and main_task.exception() is not None:
            raise main_task.exception()  # type: ignore[misc]
    return result


def run_proxy(settings: Any, config_file: str | None = None,
              overrides: dict[str, Any] | None = None,
              main: Callable[[Proxy], Awaitable[int]] | None = None) -> int:
    """Blocking entry point for ``pgscope run`` (and ``pgscope demo``, with ``main``: see serve)."""
    configure_logging(settings.log_format, settings.log_level, allow_parameters=settings.inspect.log_parameters)
    host = settings.listen_host
    if settings.effective_auth_type == "trust" and not _is_loopback(host) and not settings.allow_trust_remote:
        get_logger("pgscope").error("refusing_trust_on_remote_listen", listen=settings.listen)
        return 2
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        return runner(serve(settings, config_file, overrides, main))
    except OSError as e:
        get_logger("pgscope").error("startup_failed", error=str(e))
        return 1


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False

"""The console's commands that act: PAUSE, RESUME, DISABLE, ENABLE, RECONNECT, KILL, KILL_CLIENT,
WAIT_CLOSE, RELOAD, SHUTDOWN, SET.  Each returns its command tag or raises a PgError (severity ERROR)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from proxy.admin.show import CONSOLE_DBS
from proxy.config import KEYS, ConfigError, convert, validate
from proxy.pool import control
from proxy.protocol.errors import ADMIN_SHUTDOWN, PgError

INVALID_PARAMETER_VALUE = "22023"
UNDEFINED_OBJECT = "42704"
CANT_CHANGE_RUNTIME_PARAM = "55P02"
OBJECT_NOT_IN_STATE = "55000"
_BY_DOTTED = {k.dotted: k for k in KEYS}
FILE_ONLY = frozenset(("http_token_file",))  # read into another key by load_settings, not by SET


def error(message: str, sqlstate: str = OBJECT_NOT_IN_STATE, **kw: Any) -> PgError:
    return PgError(sqlstate, message, severity="ERROR", **kw)


def _db(args: tuple[str, ...], needed: bool = False, verb: str = "") -> str | None:
    if len(args) > 1:
        raise error(f"{verb} takes at most one database name", "42601")
    if not args:
        if needed:
            raise error(f"{verb} needs a database name", "42601")
        return None
    db = args[0]
    if db in CONSOLE_DBS:
        raise error(f"{verb} does not apply to the admin console's database {db}", INVALID_PARAMETER_VALUE)
    return db


def _terminate(sess: Any) -> None:
    srv = sess.server
    sess.fail(PgError(ADMIN_SHUTDOWN, "terminating connection due to administrator command"))
    if srv is not None and not srv.closed:
        srv.close("killed from the admin console")


async def pause(ctx: Any, args: tuple[str, ...], alive: Any) -> str:
    """Hold new transactions; return once every server of the database(s) is closed."""
    db = _db(args, verb="PAUSE")
    mgr = ctx.pools
    if control.is_paused(mgr, db) or (db is None and mgr.paused):
        raise error("already paused" if db is None else f"database {db} is already paused")
    control.pause(mgr, db)
    ctx.log.info("admin_pause", db=db)
    await control.until(lambda: control.drained(control.pools_of(mgr, db)), alive)
    return "PAUSE"


async def resume(ctx: Any, args: tuple[str, ...], alive: Any) -> str:
    db = _db(args, verb="RESUME")
    mgr = ctx.pools
    if not mgr.paused:
        raise error("nothing is paused")
    if db is not None and db not in mgr.paused:
        raise error(f"database {db} is not paused" + (" (everything is: RESUME without a name)"
                                                        if None in mgr.paused else ""))
    control.resume(mgr, db)
    ctx.log.info("admin_resume", db=db)
    return "RESUME"


async def disable(ctx: Any, args: tuple[str, ...], alive: Any) -> str:
    ctx.pools.disabled.add(_db(args, True, "DISABLE"))
    return "DISABLE"


async def enable(ctx: Any, args: tuple[str, ...], alive: Any) -> str:
    ctx.pools.disabled.discard(_db(args, True, "ENABLE"))
    return "ENABLE"


async def reconnect(ctx: Any, args: tuple[str, ...], alive: Any) -> str:
    db = _db(args, verb="RECONNECT")
    closed = control.reconnect(ctx.pools, db)
    ctx.log.info("admin_reconnect", db=db, closed_idle=closed)
    return "RECONNECT"


async def kill(ctx: Any, args: tuple[str, ...], alive: Any) -> str:
    """Close every client and server of the database(s) now; new clients wait for RESUME."""
    db = _db(args, verb="KILL")
    mgr = ctx.pools
    clients = [s for s in ctx.sessions if s.info is not None and s.state_name != "console"
               and (db is None or s.info.db == db)]
    control.pause(mgr, db)  # first: no client is given a server meanwhile
    for sess in clients:
        _terminate(sess)
    closed = control.kill(mgr, db)
    ctx.log.info("admin_kill", db=db, clients=len(clients), servers=closed)
    return "KILL"


async def kill_client(ctx: Any, args: tuple[str, ...], alive: Any) -> str:
    if len(args) != 1 or not args[0].isdigit():
        raise error("KILL_CLIENT takes a client id (the id column of SHOW CLIENTS)", "42601")
    cid = int(args[0])
    sess = next((s for s in ctx.sessions if s.id == cid), None)
    if sess is None:
        raise error(f"no client with id {cid}", UNDEFINED_OBJECT)
    ctx.log.info("admin_kill_client", client_id=cid)
    _terminate(sess)
    return "KILL_CLIENT"


async def wait_close(ctx: Any, args: tuple[str, ...], alive: Any) -> str:
    db = _db(args, verb="WAIT_CLOSE")
    await control.until(lambda: control.waiting_close(ctx.pools, db) == 0, alive)
    return "WAIT_CLOSE"


async def reload(ctx: Any, args: tuple[str, ...], alive: Any) -> str:
    ctx.reload()
    return "RELOAD"


async def shutdown(ctx: Any, args: tuple[str, ...], alive: Any) -> str:
    """As SIGTERM: stop accepting, let transactions finish (shutdown_timeout), exit.
    WAIT_FOR_SERVERS: the same (PgBouncer's name for it). WAIT_FOR_CLIENTS: stop accepting, exit
    once the clients have left."""
    mode = args[0].upper() if len(args) == 1 else "" if not args else None
    if mode not in ("", "WAIT_FOR_SERVERS", "WAIT_FOR_CLIENTS"):
        raise error("SHUTDOWN takes nothing, WAIT_FOR_SERVERS or WAIT_FOR_CLIENTS", "42601")
    ctx.log.info("admin_shutdown", mode=mode or "WAIT_FOR_SERVERS")
    # after this answer is written
    asyncio.get_running_loop().call_soon(ctx.shutdown, mode == "WAIT_FOR_CLIENTS")
    return "SHUTDOWN"


async def set_key(ctx: Any, args: tuple[str, ...], alive: Any) -> str:
    """SET key = value: a reloadable key, checked as the config file's, applied as a reload applies it."""
    name, raw = args
    key = _BY_DOTTED.get(name)
    if key is None:
        raise error(f'unrecognized configuration parameter "{name}"', UNDEFINED_OBJECT,
                    hint="SHOW CONFIG lists the keys")
    if not key.reloadable:
        raise error(f'parameter "{name}" cannot be changed without restarting pgscope', CANT_CHANGE_RUNTIME_PARAM)
    if name in FILE_ONLY:
        raise error(f'parameter "{name}" names a file read at load time: change it in the config file and RELOAD',
                    CANT_CHANGE_RUNTIME_PARAM)
    old = ctx.settings()
    try:
        value = convert(key, raw, "from SET")
        if key.section:
            section = dataclasses.replace(getattr(old, key.section), **{key.name: value})
            new = dataclasses.replace(old, **{key.section: section})
        else:
            new = dataclasses.replace(old, **{key.name: value})
        validate(new)
    except ConfigError as e:
        raise error(str(e), INVALID_PARAMETER_VALUE) from None
    ctx.apply(new)
    ctx.log.info("admin_set", key=name)  # never the value: it may be a secret
    return "SET"


ACTIONS = {
    "PAUSE": pause, "RESUME": resume, "DISABLE": disable, "ENABLE": enable, "RECONNECT": reconnect,
    "KILL": kill, "KILL_CLIENT": kill_client, "WAIT_CLOSE": wait_close, "RELOAD": reload,
    "SHUTDOWN": shutdown, "SET": set_key,
}

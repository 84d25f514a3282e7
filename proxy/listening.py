"""Where clients connect: the TCP listener, and a Unix socket as PgBouncer's ``unix_socket_dir``.

The Unix socket is ``{unix_socket_dir}/.s.PGSQL.{port}`` with the TCP listener's port, the name
PostgreSQL and PgBouncer give theirs, so ``psql -h DIR -p PORT`` and every libpq-style driver
find it.  A directory written ``@name`` is an abstract socket (Linux): no file, named
``@name/.s.PGSQL.{port}`` as libpq spells it.

The socket file is bound, given its mode and group, and only then listened on, so nobody
connects through a wider mode than the one set.  A socket file already there is taken over only
when nothing answers on it (a pgscope or PgBouncer that died without removing it); a live one,
a PostgreSQL lock file beside it, or a file of another kind stops the start with an error, never
a server's socket taken from under it.  At close the file is removed if it is still ours.
"""

from __future__ import annotations

import asyncio
import grp
import os
import socket
import stat
from typing import Any, Callable

SOCKET_NAME = ".s.PGSQL.{port}"


def socket_path(directory: str, port: int) -> str:
    """The socket's address: a file path, or an abstract name (a leading NUL) for ``@dir``."""
    name = SOCKET_NAME.format(port=port)
    if directory.startswith("@"):
        return "\0" + directory[1:].rstrip("/") + "/" + name
    return os.path.join(directory, name)


def open_peer(settings: Any, peer_id: int) -> Any:
    """A stream connection (being opened) to the pgscope process ``peer_id`` of ``settings.peers``,
    for a CancelRequest that belongs to it; None: no such peer."""
    for peer in settings.peers:
        if int(peer.peer_id) == peer_id:
            port = peer.port or settings.listen_port
            if peer.host.startswith(("/", "@")):
                return asyncio.open_unix_connection(socket_path(peer.host, port))
            return asyncio.open_connection(peer.host, port)
    return None


def shown(path: str) -> str:
    """``path`` as an operator writes it (an abstract name with its "@")."""
    return "@" + path[1:] if path.startswith("\0") else path


def parse_mode(value: str) -> int:
    """A file mode written in octal ("0777", "770"); ValueError if it is not one."""
    mode = int(value, 8)
    if not 0 <= mode <= 0o777:
        raise ValueError(f"{value!r} is not a file mode (0 to 0777)")
    return mode


def check_mode(value: str) -> str | None:
    try:
        parse_mode(value)
    except ValueError:
        return f"{value!r} is not a file mode in octal, such as 0777 or 0770"
    return None


def claim(path: str) -> None:
    """Make way for a socket at ``path``: remove a socket file nobody listens on any more.
    OSError when the place is taken (see the module's text)."""
    if path.startswith("\0"):
        return  # abstract: bind itself fails when the name is taken
    if os.path.lexists(path + ".lock"):
        raise OSError(f"unix socket {path} is PostgreSQL's: {path}.lock exists")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # left behind by a process that is gone
        return
    except OSError as e:  # a timeout (a live but busy server), a permission: not ours to take
        raise OSError(f"unix socket {path} may be in use ({e}); not taken over") from e
    finally:
        probe.close()
    raise OSError(f"unix socket {path} is in use by a running server")


def bound_socket(path: str, mode: int, group: str) -> socket.socket:
    """A Unix stream socket bound at ``path`` with ``mode`` and ``group`` (not listening yet)."""
    try:
        gid = grp.getgrnam(group).gr_gid if group else -1
    except KeyError:
        raise OSError(f"unix_socket_group: no group named {group!r}") from None
    claim(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        if not path.startswith("\0"):
            os.chmod(path, mode)
            os.chown(path, -1, gid)  # (-1: unchanged)
    except BaseException:
        sock.close()
        _unlink(path)
        raise
    return sock


def _unlink(path: str, ino: int | None = None) -> None:
    """Remove the socket file at ``path`` (only if it is still the one with inode ``ino``)."""
    if path.startswith("\0"):
        return
    try:
        if ino is None or os.lstat(path).st_ino == ino:
            os.unlink(path)
    except FileNotFoundError:
        pass


class Listeners:
    """The TCP server and, with ``unix_socket_dir``, the Unix one: closed (and the socket file
    removed) together, once, however many times ``close`` is called."""

    def __init__(self, tcp: asyncio.AbstractServer, unix: asyncio.AbstractServer | None = None,
                 unix_path: str = "") -> None:
        self.tcp = tcp
        self.unix = unix
        self.unix_path = unix_path
        self.port: int = tcp.sockets[0].getsockname()[1]
        self._ino = os.lstat(unix_path).st_ino if unix is not None and not unix_path.startswith("\0") else None
        self._closed = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.tcp.close()
        if self.unix is not None:
            self.unix.close()
            _unlink(self.unix_path, self._ino)


async def open_listeners(factory: Callable[[], Any], settings: Any) -> Listeners:
    """Listen on ``settings.listen`` and, when set, on the Unix socket in ``unix_socket_dir``."""
    loop = asyncio.get_running_loop()
    tcp = await loop.create_server(factory, settings.listen_host, settings.listen_port, reuse_address=True,
                                   reuse_port=settings.so_reuseport or None, backlog=settings.listen_backlog)
    if not settings.unix_socket_dir:
        return Listeners(tcp)
    port = tcp.sockets[0].getsockname()[1]
    path = socket_path(settings.unix_socket_dir, port)
    try:
        sock = bound_socket(path, parse_mode(settings.unix_socket_mode), settings.unix_socket_group)
        try:
            unix = await loop.create_unix_server(factory, sock=sock, backlog=settings.listen_backlog)
        except BaseException:
            sock.close()
            _unlink(path)
            raise
    except BaseException:
        tcp.close()
        await tcp.wait_closed()
        raise
    return Listeners(tcp, unix, path)

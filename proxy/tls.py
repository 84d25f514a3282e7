"""TLS contexts for both sides of the proxy.

Clients: ``client_tls_mode`` disable | allow | prefer | require.  With anything
but ``disable`` the proxy answers an SSLRequest with ``S`` and terminates TLS
itself; ``allow`` and ``prefer`` accept clients either way, ``require`` refuses
a client that did not ask for TLS (unix-socket clients excepted, as PostgreSQL's
``hostssl`` rules only ever apply to TCP).

PostgreSQL: ``server_tls_mode`` follows libpq's ``sslmode`` words: disable;
allow and prefer (try TLS, fall back to plain when the server says ``N``);
require (TLS, no certificate check); verify-ca (the chain must lead to
``server_tls_ca_file``); verify-full (and the host name must match).
"""

from __future__ import annotations

import ssl

CLIENT_MODES = ("disable", "allow", "prefer", "require")
SERVER_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def client_side_context(cert_file: str, key_file: str, ca_file: str = "") -> ssl.SSLContext:
    """The context the proxy presents to its clients; with ``ca_file`` (client_tls_ca_file) a
    client certificate is asked for and, when one is given, must chain to it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    if ca_file:
        ctx.load_verify_locations(ca_file)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def server_side_context(mode: str, ca_file: str | None = None, cert_file: str = "",
                        key_file: str = "") -> ssl.SSLContext | None:
    """The context the proxy uses towards PostgreSQL, or None for ``disable``; with ``cert_file``
    (server_tls_cert) pgscope presents that certificate when PostgreSQL asks for one."""
    if mode == "disable":
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file or None)
    if mode in ("verify-ca", "verify-full"):
        if ca_file:
            ctx.load_verify_locations(ca_file)
        else:
            ctx.load_default_certs()
        ctx.check_hostname = mode == "verify-full"
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def server_tls_required(mode: str) -> bool:
    return mode in ("require", "verify-ca", "verify-full")

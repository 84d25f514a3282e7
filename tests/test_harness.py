"""The test fixture itself: a real server, the password roles, the tools CI must have."""

from __future__ import annotations

import psycopg
import pytest

from tests.support.client import login_error
from tests.support.tools import require, require_hypopg


def test_server_is_real(pg):
    with pg.connect() as c:
        assert c.execute("select current_database()").fetchone() == ("pgscope_test",)
    assert pg.version >= 13


@pytest.mark.parametrize("role,password", [("pgscope_md5", "md5pass"), ("pgscope_scram", "scrampass"),
                                           ("pgscope_plain", "plainpass")])
def test_password_roles(pg, role, password):
    with psycopg.connect(pg.dsn(role, password)) as c:
        assert c.execute("select current_user").fetchone() == (role,)
    if pg.managed and pg.cluster.how == "binaries":
        e = login_error(pg.dsn(role, "wrong"))
        assert e.sqlstate == "28P01"
        assert e.args[0] == f'password authentication failed for user "{role}"'


def test_hypopg(pg):
    require_hypopg(pg)


@pytest.mark.parametrize("tool", ["psql", "pgbench", "pgbouncer", "promtool"])
def test_tools(tool):
    require(tool)

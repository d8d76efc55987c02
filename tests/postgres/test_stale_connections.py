"""Stale connections on a real server: a backend terminated while its connection sat idle in
the pool is met by the next client. A transaction block meets it at BEGIN, before anything of
the transaction ran, so the pool restarts it on a fresh connection instead of failing it."""

from __future__ import annotations

import uuid
from urllib.parse import urlencode

import psycopg

from supervisor import open_pool

from .cluster import Admin


def _target(dsn: str) -> str:
    app = f"tcs_{uuid.uuid4().hex[:10]}"
    return dsn + ("&" if "?" in dsn else "?") + urlencode({"application_name": app})


async def test_a_transaction_on_a_backend_killed_while_idle_commits_on_a_fresh_one(
    pg_dsn: str, pg_admin: Admin, make_table: object
) -> None:
    table = make_table("id int primary key")  # type: ignore[operator]
    async with open_pool(_target(pg_dsn), size=1, idle_interval=60, name="stale") as pool:
        pid = await pool.fetch_val("select pg_backend_pid()")
        assert pg_admin.terminate(pid)
        await pg_admin.wait_state(pid, [None])
        async with pool.transaction() as tx:
            await tx.execute(f"insert into {table} values (1)")
            new_pid = await tx.fetch_val("select pg_backend_pid()")
        assert tx.committed is True
        assert new_pid != pid
        stats = pool.statistics()
        assert stats.transaction_restarts == 1
        assert stats.connects == 2
    with psycopg.connect(pg_dsn) as check:
        assert check.execute(f"select count(*) from {table}").fetchone() == (1,)

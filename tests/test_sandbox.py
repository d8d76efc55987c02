"""The SQL sandbox on SQLite files: one connection, a transaction rolled back at the end, the
application's transactions as savepoints, tasks serialized, admission rules."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio
import trio.testing

from supervisor import PoolError, open_pool
from supervisor.testing import sandbox


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


def _count(path: Path) -> int:
    with sqlite3.connect(path) as raw:
        (n,) = raw.execute("select count(*) from t").fetchone()
        return int(n)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as raw:
        raw.execute("create table t (x integer)")
    return path


async def test_everything_in_the_block_is_rolled_back_at_the_end(db: Path) -> None:
    async with open_pool(_url(db), size=2) as pool:
        async with sandbox(pool):
            await pool.execute("insert into t values (1)")
            async with pool.transaction() as tx:  # a savepoint: its commit stays in the box
                await tx.execute("insert into t values (2)")
            assert tx.committed is True
            assert await pool.fetch_val("select count(*) from t") == 2
            assert _count(db) == 0  # nothing reached the database for good
        assert await pool.fetch_val("select count(*) from t") == 0
        assert pool.statistics().busy == 0


async def test_the_applications_rollback_undoes_only_its_own_block(db: Path) -> None:
    async with open_pool(_url(db), size=1) as pool, sandbox(pool):
        await pool.execute("insert into t values (1)")
        async with pool.transaction() as tx:
            await tx.execute("insert into t values (2)")
            tx.rollback("changed my mind")
        assert tx.committed is False
        assert await pool.fetch_column("select x from t") == [1]


async def test_a_failing_statement_does_not_poison_the_sandbox(db: Path) -> None:
    from supervisor import QueryError

    async with open_pool(_url(db), size=1) as pool, sandbox(pool):
        await pool.execute("insert into t values (1)")
        with pytest.raises(QueryError):
            await pool.execute("insert into no_such_table values (1)")
        assert await pool.fetch_val("select count(*) from t") == 1


async def test_child_tasks_share_the_connection_one_block_at_a_time(db: Path) -> None:
    order: list[str] = []
    async with open_pool(_url(db), size=3) as pool, sandbox(pool):
        first_inside = trio.Event()

        async def first() -> None:
            async with pool.transaction() as tx:
                first_inside.set()
                await tx.execute("insert into t values (1)")
                await trio.testing.wait_all_tasks_blocked()
                order.append("first done")

        async def second() -> None:
            await first_inside.wait()
            async with pool.transaction() as tx:  # waits for first's block to end
                order.append("second in")
                await tx.execute("insert into t values (2)")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            nursery.start_soon(second)
        assert order == ["first done", "second in"]
        assert await pool.fetch_val("select count(*) from t") == 2
        assert pool.statistics().checkouts == 1  # one connection for the whole box
    assert _count(db) == 0


async def test_a_task_from_outside_the_tree_is_refused_until_allowed(db: Path) -> None:
    async with open_pool(_url(db), size=2, name="box") as pool:
        ask_send, ask_receive = trio.open_memory_channel[None](0)
        answer_send, answer_receive = trio.open_memory_channel[str](0)
        tasks: list[trio.lowlevel.Task] = []

        async def outsider() -> None:
            tasks.append(trio.lowlevel.current_task())
            async for _ in ask_receive:
                try:
                    answer = str(await pool.fetch_val("select count(*) from t"))
                except PoolError as exc:
                    answer = str(exc)
                await answer_send.send(answer)

        async with trio.open_nursery() as outside:
            outside.start_soon(outsider)
            async with sandbox(pool) as box:
                await pool.execute("insert into t values (1)")
                await ask_send.send(None)
                refused = await answer_receive.receive()
                assert refused.startswith("pool 'box': task ")
                assert "is not in the sandbox" in refused and "box.allow(task)" in refused
                box.allow(tasks[0])
                await ask_send.send(None)
                assert await answer_receive.receive() == "1"  # it sees the box's own row
            outside.cancel_scope.cancel()
        assert _count(db) == 0


async def test_an_allowed_task_using_the_pool_after_the_owner_left_is_told_so(db: Path) -> None:
    async with open_pool(_url(db), size=2) as pool:
        release = trio.Event()
        errors: list[str] = []
        ready = trio.Event()
        tasks: list[trio.lowlevel.Task] = []

        async def server() -> None:
            tasks.append(trio.lowlevel.current_task())
            ready.set()
            await release.wait()
            try:
                await pool.fetch_val("select 1")
            except PoolError as exc:
                errors.append(str(exc))

        async with trio.open_nursery() as outside:
            outside.start_soon(server)
            await ready.wait()
            async with sandbox(pool) as box:
                box.allow(tasks[0])
            release.set()
        assert len(errors) == 1 and "the sandbox owner exited" in errors[0]


async def test_shared_admits_every_task(db: Path) -> None:
    async with open_pool(_url(db), size=2) as pool:
        seen: list[int] = []
        go = trio.Event()

        async def anyone() -> None:
            await go.wait()
            seen.append(await pool.fetch_val("select count(*) from t"))

        async with trio.open_nursery() as outside:
            outside.start_soon(anyone)
            async with sandbox(pool, shared=True):
                await pool.execute("insert into t values (1)")
                go.set()
                await trio.testing.wait_all_tasks_blocked()
        assert seen == [1]
    assert _count(db) == 0


async def test_a_second_sandbox_on_one_pool_is_refused(db: Path) -> None:
    async with open_pool(_url(db), size=2) as pool, sandbox(pool):
        with pytest.raises(PoolError, match="already open"):
            async with sandbox(pool):
                pass  # pragma: no cover

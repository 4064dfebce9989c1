"""The review queue over a big store: what the page asks for every 3 s is read from indexes, never a scan of the
frames table, and every order still lists exactly what the plain definition of that order lists.

At 100k frames the page's refresh (facets, a page of 200 pending frames, the stats) took 1.5 s in the oldest
order and 4 s in the least certain class by class (a loaded 2-core machine), the store's lock held all the while,
so every decision of every reviewer waited behind the open pages' refreshes (/tmp/review/bench_ab.py). The
plans are asserted, not the times: a plan does not depend on how busy the machine is.
"""

from __future__ import annotations

import json
import random
import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loop_support import real_frames

from central.review.store import FrameStore

[TEMPLATE] = real_frames(1)


def bulk_store(root, rows: list[dict]) -> FrameStore:
    """A store holding ``rows`` (frame columns over a real stored frame's), written straight into its index: the
    queries are under test here, not ingest. Reopened, so it has the indexes any store gets when it opens."""
    store = FrameStore(root, labels=["a", "b"])
    store.add(TEMPLATE.body, TEMPLATE.blob)
    template = dict(store._db.execute("SELECT * FROM frames").fetchone())
    store._db.execute("DELETE FROM frames")
    columns = list(template)
    store._db.executemany(f"INSERT INTO frames({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                          [tuple({**template, **row}[c] for c in columns) for row in rows])
    store.close()
    return FrameStore(root, labels=["a", "b"])


def plan(store: FrameStore, sql: str) -> str:
    return " | ".join(r[3] for r in store._db.execute("EXPLAIN QUERY PLAN " + sql))


def traced(store: FrameStore, call) -> list[str]:
    """The SELECT statements ``call`` runs on the store's connection (their parameters written in)."""
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    try:
        call()
    finally:
        store._db.set_trace_callback(None)
    return [s for s in statements if s.lstrip().upper().startswith("SELECT")]


def rows_for(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"{i:08d}-0000-4000-8000-000000000000", "received_at": 1_800_000_000 + rng.randrange(n // 2 + 1),
             "margin": None if rng.random() < 0.1 else rng.choice([0.0, 0.5, rng.random()]),
             "predicted": rng.choice(["a", "b", "c", None]), "station": rng.choice(["s1", "s2"]),
             "status": rng.choice(["pending", "pending", "labelled"]), "label": rng.choice(["a", None]),
             "model_version": rng.choice(["1", "2"]), "camera": rng.choice(["c1", "c2"])} for i in range(n)]


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    store = bulk_store(tmp_path_factory.mktemp("big"), rows_for(2000))
    yield store
    store.close()


@pytest.mark.parametrize("order", ["oldest", "newest", "least-certain", "least-certain-by-class"])
def test_a_page_of_the_pending_queue_is_chosen_from_an_index_in_every_order(big, order):
    """Given a store, when the page asks for 200 pending frames at an offset, then the frames of the page are chosen
    by walking a covering index (no table scan, no sort of every pending frame's row), in every order."""
    statements = traced(big, lambda: big.list(status="pending", limit=200, offset=300, order=order))
    page = next(s for s in statements if "LIMIT" in s and "COUNT" not in s)
    query_plan = plan(big, page)
    assert "COVERING INDEX" in query_plan and "SCAN frames" not in query_plan, query_plan
    if order != "newest":       # newest: the index walked backwards, its ties (same received_at) sorted by id
        assert "ORDER BY" not in query_plan.split("SCAN (subquery")[0], query_plan


def test_the_facets_and_the_stats_are_read_from_indexes(big):
    """Given a store, when the page asks for the facets and the stats, then no statement scans the frames table."""
    for call in (big.facets, big.stats):
        for sql in traced(big, call):
            if "FROM frames" in sql:
                query_plan = plan(big, sql)
                assert "SCAN frames" not in query_plan or "USING COVERING INDEX" in query_plan, (sql, query_plan)


def reference(rows: list[dict], order: str, **filters) -> list[str]:
    """The ids in ``order`` by the orders' definitions (store.list's docstring), in plain Python."""
    chosen = [r for r in rows if all(r[k] == v for k, v in filters.items())]

    def by_margin(r):
        return (r["margin"] is None, r["margin"] if r["margin"] is not None else 0, r["received_at"], r["id"])
    if order == "oldest":
        return [r["id"] for r in sorted(chosen, key=lambda r: (r["received_at"], r["id"]))]
    if order == "newest":
        return [r["id"] for r in sorted(chosen, key=lambda r: (-r["received_at"], r["id"]))]
    if order == "least-certain":
        return [r["id"] for r in sorted(chosen, key=by_margin)]
    turn = {}
    for cls in {r["predicted"] for r in chosen}:
        for i, r in enumerate(sorted((r for r in chosen if r["predicted"] == cls), key=by_margin), start=1):
            turn[r["id"]] = i
    return [r["id"] for r in sorted(chosen, key=lambda r: (r["margin"] is None, turn[r["id"]], *by_margin(r)))]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 60), seed=st.integers(0, 10 ** 6), order=st.sampled_from(
    ["oldest", "newest", "least-certain", "least-certain-by-class"]), limit=st.integers(1, 25),
       offset=st.integers(0, 70), filtered=st.sampled_from([{}, {"status": "pending"}, {"station": "s1"},
                                                            {"status": "pending", "predicted": "b"}]))
def test_every_page_in_every_order_is_the_orders_definition(tmp_path_factory, n, seed, order, limit, offset,
                                                            filtered):
    """Given frames with ties in time and margin, frames without a margin or a predicted class, when any page of
    any order is asked for under a filter, then it is exactly that slice of the order as defined, and the total
    counts every matching frame."""
    rows = rows_for(n, seed)
    store = bulk_store(tmp_path_factory.mktemp("orders"), rows)
    try:
        frames, total = store.list(limit=limit, offset=offset, order=order, **filtered)
        expected = reference(rows, order, **filtered)
        assert [f["id"] for f in frames] == expected[offset:offset + limit]
        assert total == len(expected)
    finally:
        store.close()


def test_an_existing_store_gets_the_indexes_when_it_opens(tmp_path):
    """Given a store written before the queue's indexes, when it is opened, then it has them."""
    store = bulk_store(tmp_path / "s", rows_for(50))
    store.close()
    db = sqlite3.connect(tmp_path / "s" / "frames.sqlite")
    for name in ("frames_queue", "frames_certainty", "frames_class_certainty", "frames_by_station"):
        db.execute(f"DROP INDEX {name}")
    db.commit()
    db.close()
    store = FrameStore(tmp_path / "s")
    try:
        names = {r[0] for r in store._db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"frames_queue", "frames_certainty", "frames_class_certainty", "frames_by_station"} <= names
        assert json.loads(json.dumps(store.list(order="least-certain-by-class")[0][0]["top_k"]))
    finally:
        store.close()

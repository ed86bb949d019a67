from datetime import UTC, datetime, timedelta

import polars as pl

from lakehouse.transforms import silver

T = datetime(2026, 1, 1, tzinfo=UTC)


def changes(rows: list[tuple[int, str, int, int | None]]) -> pl.DataFrame:
    """(key, op, minutes after T, value)."""
    return pl.DataFrame(
        {
            "id": [r[0] for r in rows],
            "_op": [r[1] for r in rows],
            "_source_ts": [T + timedelta(minutes=r[2]) for r in rows],
            "updated_at": [T + timedelta(minutes=r[2]) if r[1] == "upsert" else None for r in rows],
            "value": [r[3] for r in rows],
            "_batch_id": [1] * len(rows),
        }
    )


def test_latest_change_wins_including_deletes() -> None:
    frame = changes(
        [
            (1, "upsert", 2, 20),
            (1, "upsert", 1, 10),
            (2, "upsert", 1, 5),
            (2, "delete", 3, None),
            (3, "upsert", 4, 7),
        ]
    )
    latest = silver.latest(frame, "id").sort("id")
    assert latest.select("id", "_op", "value").rows() == [
        (1, "upsert", 20),
        (2, "delete", None),
        (3, "upsert", 7),
    ]


def test_scd2_versions_and_closings() -> None:
    frame = changes(
        [(1, "upsert", 1, 10), (1, "upsert", 5, 11), (1, "delete", 9, None), (2, "upsert", 3, 1)]
    )
    versions, closings = silver.scd2(frame, "id")
    got = (
        versions.sort("id", "valid_from")
        .select("id", "value", "valid_from", "valid_to", "is_current")
        .rows()
    )
    assert got == [
        (1, 10, T + timedelta(minutes=1), T + timedelta(minutes=5), False),
        (1, 11, T + timedelta(minutes=5), T + timedelta(minutes=9), False),
        (2, 1, T + timedelta(minutes=3), None, True),
    ]
    assert sorted(closings.rows()) == [(1, T + timedelta(minutes=1)), (2, T + timedelta(minutes=3))]


def test_upsert_sorts_before_delete_at_the_same_instant() -> None:
    frame = changes([(1, "delete", 1, None), (1, "upsert", 1, 10)])
    assert silver.latest(frame, "id")["_op"].to_list() == ["delete"]

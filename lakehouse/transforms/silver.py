"""Silver transforms: WAL order, one state per key, SCD2 history and current rejects.

Every change is an event of its key, in WAL order (`_lsn`, `_seq`): an upsert that passes
the rules (the key is *good*: in silver), one that fails them (*bad*: a current reject),
or a delete (*absent*). From the key's state before these events (`prior`) and the events
themselves follow, per key:

- history: each good event opens a version; the key's next event (any kind) closes it;
- current: the key's last event decides: good -> that row, otherwise no row;
- rejects: each bad event is a reject row, current while it is the key's last event.

Order is the WAL's, never a timestamp's. Times only date the versions: an event's
instant is its `_source_ts` (the row's `updated_at`, or the delete's time), pushed
forward when needed so that a key's instants strictly increase in WAL order (a clock
that stepped back, an imported future `updated_at`): `valid_from < valid_to` always.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from lakehouse.transforms.segments import ends, index_in_key, segmented_scan, starts

GOOD, BAD = "good", "bad"
_US = pl.Datetime("us", "UTC")
_NEVER = -(2**62)


def to_silver_types(frame: pl.DataFrame, table: str) -> pl.DataFrame:
    """Give validated rows their silver types (only after the rules have passed)."""
    if table == "applicants" and frame.schema.get("previous_loan_defaults_on_file") == pl.Utf8:
        return frame.with_columns(
            pl.col("previous_loan_defaults_on_file").replace_strict(
                {"Yes": True, "No": False}, default=None, return_dtype=pl.Boolean
            )
        )
    return frame


def to_raw_types(frame: pl.DataFrame, table: str) -> pl.DataFrame:
    """Undo `to_silver_types`: silver rows back in the source's types."""
    if table == "applicants" and frame.schema.get("previous_loan_defaults_on_file") == pl.Boolean:
        return frame.with_columns(
            pl.col("previous_loan_defaults_on_file").replace_strict(
                {True: "Yes", False: "No"}, default=None, return_dtype=pl.Utf8
            )
        )
    return frame


def ordered(changes: pl.DataFrame, key: str) -> pl.DataFrame:
    """Sort changes per key in WAL order.

    Position first (`_lsn`, `_seq`: a batch's snapshot, or a change's commit). Within one
    batch a truncate comes first, then a key's tombstones, then its row: if the row is
    in the snapshot, it is the key's state, whatever the timestamps say. Events made by
    silver itself (`_rank` 2: an applicant arrived or left) come after the key's own
    changes.
    """
    op = pl.col("_op")
    rank = pl.when(op == "truncate").then(-1).when(op == "delete").then(0).otherwise(1)
    if "_synthetic" in changes.columns:
        rank = pl.when(pl.col("_synthetic").fill_null(False)).then(2).otherwise(rank)
    return (
        changes.with_columns(_rank=rank)
        .sort([key, "_lsn", "_seq", "_rank", "_source_ts"], nulls_last=False)
        .drop("_rank")
    )


def drop_repeats(rows: pl.DataFrame, prior: pl.DataFrame, key: str) -> pl.DataFrame:
    """Drop events that change nothing: a delete of an absent key, a repeated version.

    A batch sees states, not changes: after a stream teardown, a migration, or a repair,
    it can bring a version silver already holds. That is no new version. (Stream
    changes, repairs and silver's own events are kept: they are changes.) A delete of a
    key that is not there (a tombstone seen twice, a truncate of unknown keys) is nothing.
    `rows` are ordered and carry `_image`; `prior` has `_prior_state`, `_prior_image`.
    """
    if rows.height == 0:
        return rows
    rows = rows.join(
        prior.select(key, "_prior_state", "_prior_image"), on=key, how="left", maintain_order="left"
    )
    upsert = pl.col("_op") == "upsert"
    # Whether the key exists before each row (after the previous one), and its image.
    existed = (
        pl.when(starts(key)).then(pl.col("_prior_state").is_not_null()).otherwise(upsert.shift(1))
    )
    previous = (
        pl.when(starts(key))
        .then(pl.col("_prior_image"))
        .when(upsert.shift(1))
        .then(pl.col("_image").shift(1))
    )
    changed = pl.col("_stream") | pl.col("_repair") | pl.col("_synthetic").fill_null(False)
    repeat = upsert & ~changed & previous.is_not_null() & (pl.col("_image") == previous)
    no_op_delete = ~upsert & ~existed.fill_null(False)
    return rows.filter(~repeat & ~no_op_delete).drop("_prior_state", "_prior_image")


def instants(rows: pl.DataFrame, prior: pl.DataFrame, key: str) -> pl.DataFrame:
    """Add `_at`: each event's instant, strictly increasing per key in WAL order.

    `_at[j] = max(_source_ts[j], _at[j-1] + 1µs)`, starting after the key's last instant
    in `prior` (`_prior_instant`). In closed form, with `j` the event's index in its key:
    `_at[j] = j + max(prior + 1, max over k <= j of (ts[k] - k))`, one segmented running
    max.
    """
    if rows.height == 0:
        return rows.with_columns(_at=pl.lit(None, _US))
    j = index_in_key(key)
    frame = rows.join(
        prior.select(key, "_prior_instant"), on=key, how="left", maintain_order="left"
    ).with_columns(
        _j=j,
        _b=(pl.col("_source_ts").dt.epoch("us") - j).fill_null(_NEVER),
        _p=(pl.col("_prior_instant").dt.epoch("us") + 1).fill_null(_NEVER),
    )
    frame = segmented_scan(frame, "_b", key, "max")
    at = pl.col("_j") + pl.max_horizontal("_b", "_p")
    return frame.with_columns(
        _at=pl.when(pl.max_horizontal("_b", "_p") == _NEVER).then(None).otherwise(at).cast(_US)
    ).drop("_j", "_b", "_p", "_prior_instant")


@dataclass(frozen=True)
class Outcome:
    """What the events do to each silver target."""

    history: pl.DataFrame
    """New versions: the good events, `valid_from`, `valid_to` (null while open), `is_current`."""
    history_closings: pl.DataFrame
    """(key, `_close_at`): the open version each key had before these events, closed."""
    current: pl.DataFrame
    """Per key, its last event: good rows (`_op` upsert) and deletes (`_op` delete)."""
    rejects: pl.DataFrame
    """The bad events, `valid_from`, `valid_to` (the key's next event), `is_current`."""
    reject_closings: pl.DataFrame
    """(key, `_close_at`): the current reject each key had before these events, closed."""


def outcome(rows: pl.DataFrame, prior: pl.DataFrame, key: str) -> Outcome:
    """Apply ordered, classified events (`_state`, `_at`) to the keys' prior states.

    `rows` are ordered, with `_state` (good, bad, or null for a delete) and `_at`;
    `prior` has, per key, `_prior_state` (good, bad, or null).
    """
    last = ends(key)
    first = starts(key)
    frame = rows.with_columns(
        _last=last,
        _first=first,
        _next_at=pl.when(last).then(None).otherwise(pl.col("_at").shift(-1)),
    )
    versions = frame.filter(pl.col("_state") == GOOD).with_columns(
        valid_from=pl.col("_at"),
        valid_to=pl.col("_next_at"),
        is_current=pl.col("_last"),
    )
    firsts = frame.filter(pl.col("_first")).join(
        prior.select(key, "_prior_state"), on=key, how="left"
    )
    history_closings = firsts.filter(pl.col("_prior_state") == GOOD).select(
        key, _close_at=pl.col("_at")
    )
    reject_closings = firsts.filter(pl.col("_prior_state") == BAD).select(
        key, _close_at=pl.col("_at")
    )
    finals = frame.filter(pl.col("_last")).with_columns(
        _op=pl.when(pl.col("_state") == GOOD).then(pl.lit("upsert")).otherwise(pl.lit("delete"))
    )
    rejects = frame.filter(pl.col("_state") == BAD).with_columns(
        valid_from=pl.col("_at"), valid_to=pl.col("_next_at"), is_current=pl.col("_last")
    )
    helpers = ["_last", "_first", "_next_at"]
    return Outcome(
        history=versions.drop(helpers),
        history_closings=history_closings,
        current=finals.drop(helpers),
        rejects=rejects.drop(helpers),
        reject_closings=reject_closings,
    )

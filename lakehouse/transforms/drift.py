"""Feature drift: what the model sees in production against what it was trained on.

`gold.feature_drift_daily` compares, per model version, day and feature, the feature
values the API served (`bronze.predictions.features`, the exact vectors scored) with the
training set of the model version that served them. Each version's training set is
summarised once as a *reference* (`reference`): for a number, the training deciles'
edges and the share of training values in each of the bins they make; for a category
(or a boolean), each level's share, plus an "unseen" level with share 0. The served
values are binned the same way in SQL (`FEATURE_DRIFT_DAILY`), and per day:

- **PSI**, the population stability index, sum over bins of (a - e) * ln(a / e), with the
  served share `a` and the training share `e` each floored at 1e-4 (an empty bin would
  make it infinite). The usual reading: below 0.1 stable, 0.1-0.25 a shift worth a look,
  above 0.25 a different population.
- For categories, also the **Jensen-Shannon distance** (base 2: 0 for the same shares,
  1 for disjoint levels). It needs no floor, is bounded and symmetric, and a level never
  seen in training moves it as much as its share says.
- The **share of missing values** served and in training: a feature that stops arriving
  shows here before it shows in any statistic over the values that remain.

Thresholds are settings (`LAKEHOUSE_DRIFT_*`), applied when the table is read
(`lakehouse status`, `lakehouse report`), so changing one needs no rebuild.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np

FLOOR = 1e-4
"""Smallest share PSI uses for a bin (served or expected)."""
DECILES = [i / 10 for i in range(1, 10)]

Kind = Literal["numeric", "categorical"]

REFERENCE_COLUMNS = (
    "model_version",
    "feature",
    "kind",
    "path",
    "edges",
    "levels",
    "expected",
    "training_rows",
    "training_missing_share",
)
"""Columns of the `drift_reference` relation `FEATURE_DRIFT_DAILY` reads (one row per model
version and feature)."""


def level(value: Any) -> str:
    """Return a category's level as the served JSON spells it (booleans `true`/`false`)."""
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    return str(value)


def _missing(value: Any) -> bool:
    """Tell None, NaN, NaT and pandas' NA (whose comparison has no truth value)."""
    if value is None:
        return True
    try:
        return bool(value != value)
    except TypeError:
        return True


def quantile(ordered: Sequence[float], q: float) -> float:
    """Return the `q` quantile of sorted values, interpolated linearly (numpy's default)."""
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def reference(feature: str, kind: Kind, values: Iterable[Any]) -> dict[str, Any]:
    """Summarise one feature's training values as the bins drift is measured in.

    Numbers: the distinct training deciles are the edges; bin `i` holds the values above
    `edges[i-1]` up to `edges[i]` (bin 0 everything up to the first edge, the last bin
    everything above the last). Categories: bin `i` is `levels[i]`, and one more bin
    holds levels never seen in training. `expected` is each bin's share of the training
    values present (empty when none is).
    """
    values = list(values)
    present = [v for v in values if not _missing(v)]
    edges: list[float] = []
    levels: list[str] = []
    if kind == "numeric":
        ordered = sorted(float(v) for v in present if math.isfinite(float(v)))
        present = ordered
        if ordered:
            edges = sorted({quantile(ordered, q) for q in DECILES})
        counts = [0] * (len(edges) + 1)
        for v in ordered:
            counts[_bin(edges, v)] += 1
    else:
        spelled = [level(v) for v in present]
        levels = sorted(set(spelled))
        index = {name: i for i, name in enumerate(levels)}
        counts = [0] * (len(levels) + 1)  # the last: unseen in training
        for name in spelled:
            counts[index[name]] += 1
    total = sum(counts)
    return {
        "feature": feature,
        "kind": kind,
        "path": f'$."{feature}"',
        "edges": edges,
        "levels": levels,
        "expected": [c / total for c in counts] if total else [],
        "training_rows": len(values),
        "training_missing_share": (len(values) - len(present)) / len(values) if values else None,
    }


def _bin(edges: Sequence[float], value: float) -> int:
    """Return the bin of a number: how many edges lie strictly below it (as the SQL counts)."""
    return sum(1 for e in edges if e < value)


# Per model version, day and feature: the served values binned as in `reference` (a
# number that is not finite, or not a number, counts as missing), each bin's share of the
# values present against its training share, and the statistics above. `predictions`
# counts the day's predictions of the version; PSI and the distance are null on a day
# when every value was missing.
FEATURE_DRIFT_DAILY = f"""
WITH entries AS (
    -- Each vector parsed once, into its (feature, value) entries.
    SELECT
        p.model_version, CAST(p.served_at AS DATE) AS day,
        unnest(map_entries(CAST(p.features::JSON AS MAP(VARCHAR, JSON)))) AS entry
    FROM predictions AS p
),
served AS (
    SELECT
        model_version, day, entry.key AS feature, entry.value ->> '$' AS raw,
        -- Numbers only where JSON has a number: the model reads a string as missing.
        CASE WHEN json_type(entry.value) IN ('BIGINT', 'UBIGINT', 'DOUBLE')
            THEN TRY_CAST(entry.value ->> '$' AS DOUBLE)
        END AS number
    FROM entries
),
binned AS (
    SELECT
        s.model_version, s.day, s.feature,
        CASE
            WHEN r.kind = 'numeric' THEN
                CASE WHEN isfinite(s.number) THEN
                    len(list_filter(r.edges, lambda e: e < s.number))
                END
            WHEN s.raw IS NOT NULL THEN
                coalesce(list_position(r.levels, s.raw) - 1, len(r.levels))
        END AS bin
    FROM served AS s
    JOIN drift_reference AS r USING (model_version, feature)
),
counts AS (
    SELECT model_version, day, feature, bin, count(*) AS n
    FROM binned
    WHERE bin IS NOT NULL
    GROUP BY ALL
),
days AS (
    SELECT model_version, CAST(served_at AS DATE) AS day, count(*) AS predictions
    FROM predictions
    GROUP BY ALL
),
totals AS (
    -- A value that is null, not a finite number where one is due, or not in the vector
    -- at all is missing.
    SELECT
        d.model_version, d.day, r.feature, d.predictions,
        d.predictions - coalesce(sum(c.n), 0) AS missing
    FROM days AS d
    JOIN drift_reference AS r USING (model_version)
    LEFT JOIN counts AS c
        ON c.model_version = d.model_version AND c.day = d.day AND c.feature = r.feature
    GROUP BY d.model_version, d.day, r.feature, d.predictions
),
expected AS (
    SELECT model_version, feature, unnest(range(len(expected))) AS bin, unnest(expected) AS e
    FROM drift_reference
),
shares AS (
    SELECT
        t.model_version, t.day, t.feature,
        coalesce(c.n, 0) / nullif(t.predictions - t.missing, 0) AS a,
        x.e
    FROM totals AS t
    JOIN expected AS x ON x.model_version = t.model_version AND x.feature = t.feature
    LEFT JOIN counts AS c
        ON c.model_version = t.model_version AND c.day = t.day
        AND c.feature = t.feature AND c.bin = x.bin
),
stats AS (
    SELECT
        model_version, day, feature,
        sum((greatest(a, {FLOOR}) - greatest(e, {FLOOR}))
            * ln(greatest(a, {FLOOR}) / greatest(e, {FLOOR}))) AS psi,
        sqrt(greatest(
            sum(CASE WHEN a > 0 THEN 0.5 * a * log2(a / ((a + e) / 2)) ELSE 0 END)
            + sum(CASE WHEN e > 0 THEN 0.5 * e * log2(e / ((a + e) / 2)) ELSE 0 END),
            0
        )) AS js,
        count(a) AS bins_present
    FROM shares
    GROUP BY ALL
)
SELECT
    t.model_version, t.day, t.feature, r.kind,
    t.predictions,
    t.predictions - t.missing AS present,
    t.missing / t.predictions AS missing_share,
    r.training_missing_share,
    CASE WHEN s.bins_present > 0 THEN s.psi END AS psi,
    CASE WHEN s.bins_present > 0 AND r.kind = 'categorical' THEN s.js END AS js_distance,
    r.training_rows,
    CAST(t.day AS TIMESTAMPTZ) AS event_timestamp
FROM totals AS t
JOIN drift_reference AS r USING (model_version, feature)
LEFT JOIN stats AS s USING (model_version, day, feature)
ORDER BY t.model_version, t.day, t.feature
"""

"""The report's figures, drawn with matplotlib as inline SVG (pure: data in, SVG out).

matplotlib rather than plotly: its SVG is static markup, so the page needs no script at
all (plotly's interactive figures need its 3.5 MB JavaScript bundle inlined in every
report, or fetched from a CDN, which a report read offline cannot do). Text is drawn as
paths (`svg.fonttype: path`), so the page looks the same without the fonts, and a fixed
hash salt makes the same data give the same file. Each function returns None when there
is nothing to draw yet; the page then says what would fill it.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import polars as pl
from matplotlib.figure import Figure

_STYLE: dict[Any, Any] = {
    "svg.fonttype": "path",
    "svg.hashsalt": "lakehouse-report",
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
}
_RED, _BLUE, _GREY = "#c0392b", "#2c6fbb", "#888888"


@contextmanager
def _figure(width: float = 8.0, height: float = 3.4, rows: int = 1) -> Iterator[Any]:
    import matplotlib

    with matplotlib.rc_context(_STYLE):
        figure = Figure(figsize=(width, height), layout="constrained")
        axes = figure.subplots(rows, 1, squeeze=False)[:, 0]
        yield figure, list(axes)


def _svg(figure: Figure) -> str:
    import matplotlib

    with matplotlib.rc_context(_STYLE):
        out = io.StringIO()
        figure.savefig(out, format="svg", metadata={"Date": None})
    text = out.getvalue()
    return text[text.index("<svg") :]  # inline: no XML declaration or DOCTYPE


def rows_and_rejects(versions: pl.DataFrame, rejects: pl.DataFrame | None) -> str | None:
    """Draw the versions accepted into silver per day, and rejects per rule per day."""
    if versions.is_empty() and (rejects is None or rejects.is_empty()):
        return None
    with _figure(height=4.2, rows=2) as (figure, (top, bottom)):
        top.plot(versions["day"].to_list(), versions["versions"].to_list(), color=_BLUE, lw=1)
        top.set_ylabel("versions accepted")
        if rejects is None or rejects.is_empty():
            bottom.text(0.5, 0.5, "no rejects", ha="center", va="center")
        else:
            for (rule,), group in rejects.group_by("rule", maintain_order=True):
                bottom.plot(
                    group["day"].to_list(),
                    group["rejects"].to_list(),
                    marker="o",
                    ms=3,
                    lw=0.8,
                    label=str(rule),
                )
            bottom.legend(fontsize=7, ncols=2)
        bottom.set_ylabel("rejects per rule")
        bottom.sharex(top)
        return _svg(figure)


def freshness(tables: list[dict[str, Any]], online_behind: float | None) -> str | None:
    """Draw how far each table is behind the source, and the online store behind silver."""
    rows = [(t["table"], t["behind_seconds"]) for t in tables if t["behind_seconds"] is not None]
    if online_behind is not None:
        rows.append(("online store (behind silver)", online_behind))
    if not rows:
        return None
    with _figure(height=0.3 * len(rows) + 1.0) as (figure, (ax,)):
        names = [r[0] for r in rows][::-1]
        seconds = [r[1] for r in rows][::-1]
        ax.barh(names, seconds, color=[_RED if s > 0 else _BLUE for s in seconds])
        for y, s in enumerate(seconds):
            ax.text(s, y, f" {s:,.1f} s", va="center", fontsize=7)
        ax.set_xlim(0, max(1.0, max(seconds)) * 1.15)
        ax.set_xlabel("seconds behind (0: holds the newest change)")
        return _svg(figure)


def roc(curve: dict[str, list[float]], auc: float) -> str:
    """Draw the model's ROC curve on its hold-out."""
    with _figure(width=4.2, height=3.8) as (figure, (ax,)):
        ax.plot(curve["fpr"], curve["tpr"], color=_BLUE, lw=1.5, label=f"ROC AUC {auc:.3f}")
        ax.plot([0, 1], [0, 1], color=_GREY, ls="--", lw=0.8)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(loc="lower right")
        return _svg(figure)


def calibration(points: list[dict[str, float]], brier: float) -> str:
    """Draw the predicted probability against the observed approval rate, by quantile bin."""
    with _figure(width=4.2, height=3.8) as (figure, (ax,)):
        ax.plot(
            [p["predicted"] for p in points],
            [p["observed"] for p in points],
            marker="o",
            color=_BLUE,
            label=f"Brier {brier:.3f}",
        )
        ax.plot([0, 1], [0, 1], color=_GREY, ls="--", lw=0.8)
        ax.set_xlabel("mean predicted probability")
        ax.set_ylabel("observed approval rate")
        ax.legend(loc="upper left")
        return _svg(figure)


def importances(rows: list[dict[str, Any]], top: int = 15) -> str:
    """Draw the permutation importances (drop in hold-out ROC AUC), the largest first."""
    shown = rows[:top][::-1]
    with _figure(height=0.28 * len(shown) + 1.0) as (figure, (ax,)):
        ax.barh(
            [r["feature"] for r in shown],
            [r["mean"] for r in shown],
            xerr=[r["std"] for r in shown],
            color=_BLUE,
        )
        ax.set_xlabel("drop in ROC AUC when shuffled")
        return _svg(figure)


def quality(frame: pl.DataFrame | None, evaluated: dict[str, float]) -> str | None:
    """Draw the daily ROC AUC and Brier score per model version, against the evaluation AUC."""
    if frame is None:
        return None
    scored = frame.filter(pl.col("roc_auc").is_not_null()).sort("day")
    if scored.is_empty():
        return None
    with _figure(height=4.2, rows=2) as (figure, (top, bottom)):
        for (version,), group in scored.group_by("model_version", maintain_order=True):
            line = top.plot(group["day"].to_list(), group["roc_auc"].to_list(), marker="o")
            if version in evaluated:
                top.axhline(evaluated[version], color=line[0].get_color(), ls="--", lw=0.8)
            bottom.plot(
                group["day"].to_list(), group["brier"].to_list(), marker="o", label=str(version)
            )
        days = scored["day"].unique().sort().to_list()
        if len(days) == 1:  # one day: a week around it, not years of empty axis
            top.set_xlim(days[0] - timedelta(days=3), days[0] + timedelta(days=3))
        top.set_ylabel("ROC AUC (dashed: evaluation)")
        bottom.set_ylabel("Brier score")
        bottom.legend(fontsize=7)
        bottom.sharex(top)
        return _svg(figure)


def drift(frame: pl.DataFrame | None, thresholds: dict[str, float], min_count: int) -> str | None:
    """Draw, per feature and day, the newest version's drift statistic over its threshold.

    Numeric features show PSI, categorical ones the Jensen-Shannon distance; 1 is the
    threshold (`thresholds[kind]`), so every feature reads on one scale. The newest version
    serving on the newest day is drawn. A day with fewer than `min_count` values present is
    left blank: too few to judge (as `lakehouse status`).
    """
    if frame is None or frame.is_empty():
        return None
    version = str(frame.filter(pl.col("day") == frame["day"].max())["model_version"].max())
    rows = frame.filter(pl.col("model_version") == version).with_columns(
        value=pl.when(pl.col("kind") == "numeric")
        .then(pl.col("psi"))
        .otherwise(pl.col("js_distance"))
    )
    rows = rows.with_columns(
        ratio=pl.col("value") / pl.col("kind").replace_strict(thresholds, return_dtype=pl.Float64)
    )
    features = sorted(rows["feature"].unique().to_list())
    days = sorted(rows["day"].unique().to_list())
    grid = [[float("nan")] * len(days) for _ in features]
    for r in rows.iter_rows(named=True):
        if r["ratio"] is not None and r.get("present", r["predictions"]) >= min_count:
            grid[features.index(r["feature"])][days.index(r["day"])] = r["ratio"]
    with _figure(height=0.25 * len(features) + 1.6) as (figure, (ax,)):
        image = ax.imshow(grid, aspect="auto", cmap="RdYlBu_r", vmin=0, vmax=2)
        ax.set_yticks(range(len(features)), features)
        step = max(1, len(days) // 8)
        ax.set_xticks(range(0, len(days), step), [str(d) for d in days[::step]])
        ax.grid(False)
        ax.set_title(
            f"model {version}: drift statistic / threshold (above 1: drifting; blank: "
            f"fewer than {min_count} values that day)",
            fontsize=8,
        )
        figure.colorbar(image, ax=ax, shrink=0.8)
        return _svg(figure)

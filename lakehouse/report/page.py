"""The report page: the figures of `charts` in one HTML file with inline CSS, no script."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from html import escape
from pathlib import Path
from typing import Any

from lakehouse.errors import LakehouseError, described
from lakehouse.log import redact
from lakehouse.report import charts
from lakehouse.report.data import ReportData
from lakehouse.settings import Settings

log = logging.getLogger(__name__)

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 62em;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
.meta { color: #666; margin-top: 0.2em; }
figure { margin: 1em 0; } figure svg { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.9em; }
.row { display: flex; flex-wrap: wrap; gap: 1em; } .row figure { flex: 1 1 22em; }
.empty { padding: 1em; background: #f6f6f6; color: #666; border-radius: 4px; }
.flag { color: #a93226; } .error { color: #a93226; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def _figure(name: str, svg: str | None, caption: str, empty: str) -> str:
    if svg is None:
        return (
            f'<figure class="empty" data-plot="{name}" data-empty="true">'
            f"<p>{escape(empty)}</p></figure>"
        )
    return f'<figure data-plot="{name}">{svg}<figcaption>{escape(caption)}</figcaption></figure>'


def render(data: ReportData, settings: Settings) -> str:
    """Return the whole page."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>Lakehouse report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Lakehouse report</h1>",
        f'<p class="meta">generated {data.at:%Y-%m-%d %H:%M:%S} UTC from '
        f"<code>{escape(redact(data.warehouse))}</code> by <code>lakehouse report</code></p>",
    ]
    parts += _errors(data)
    sections: list[tuple[str, Callable[[], list[str]]]] = [
        ("Rows and rejects per rule", lambda: _rows(data)),
        ("Freshness", lambda: _freshness(data)),
        ("Model", lambda: _model(data)),
        ("Quality and drift", lambda: _monitoring(data, settings)),
    ]
    for title, section in sections:
        try:
            parts += section()
        except Exception as exc:  # one part that cannot be drawn does not cost the page
            log.warning("report: %s could not be drawn: %s", title, described(exc))
            parts.append(
                f'<h2>{escape(title)}</h2><p class="error">This part could not be drawn: '
                f"{escape(redact(described(exc)))}</p>"
            )
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _errors(data: ReportData) -> list[str]:
    sections = {
        "source": data.status.source_error,
        "tables": data.status.tables_error,
        "features and model": data.status.features_error,
        **data.errors,
    }
    failed = {k: v for k, v in sections.items() if v}
    if not failed:
        return []
    items = "".join(f"<li>{escape(k)}: {escape(redact(v))}</li>" for k, v in failed.items())
    return [f'<p class="error">Parts that could not be read:</p><ul class="error">{items}</ul>']


def _rows(data: ReportData) -> list[str]:
    out = ["<h2>Rows and rejects per rule</h2>"]
    for table, versions in data.versions_per_day.items():
        out.append(
            _figure(
                f"rows-{table}",
                charts.rows_and_rejects(versions, data.rejects_per_day.get(table)),
                f"silver.{table}: versions accepted per day (by valid_from), and the versions "
                f"that failed a rule (silver.{table}_rejected, by the first rule failed)",
                f"silver.{table} holds no rows yet: run `lakehouse run`",
            )
        )
    if not data.versions_per_day:
        out.append(_figure("rows", None, "", "no silver tables yet: run `lakehouse run`"))
    return out


def _freshness(data: ReportData) -> list[str]:
    tables = [{"table": t.table, "behind_seconds": t.behind_seconds} for t in data.status.tables]
    online = data.status.features.get("online_behind_silver_seconds")
    return [
        "<h2>Freshness</h2>",
        _figure(
            "freshness",
            charts.freshness(tables, online),
            "how far each table is behind the source's newest change, and the online store "
            "behind silver (as `lakehouse status` measures them)",
            "no tables yet: run `lakehouse run`",
        ),
    ]


def _model(data: ReportData) -> list[str]:
    out = ["<h2>Model</h2>"]
    if data.model is None:
        out.append(_figure("roc", None, "", "no model yet: run `lakehouse train`"))
        return out
    from lakehouse.ml import models

    metrics, curves, lineage = data.model["metrics"], data.model["curves"], data.model["lineage"]
    inputs = ", ".join(f"{t} v{v}" for t, v in sorted(lineage["inputs"].items()))
    out.append(
        f"<p>Serving version <code>{escape(data.model['version'])}</code>, trained "
        f"{escape(lineage['trained_at'])} on {lineage['training_set']['rows']:,} rows from "
        f"{escape(inputs)}. {escape(models.summary(metrics))}.</p>"
    )
    test = metrics["test"]
    out.append('<div class="row">')
    out.append(
        _figure(
            "roc",
            charts.roc(curves["roc"], test["roc_auc"]),
            "ROC curve on the stratified hold-out",
            "",
        )
    )
    out.append(
        _figure(
            "calibration",
            charts.calibration(test["calibration"], test["brier"]),
            "calibration on the hold-out, in ten quantile bins",
            "",
        )
    )
    out.append("</div>")
    out.append(
        _figure(
            "importances",
            charts.importances(curves["permutation_importance"]),
            "permutation importance: the hold-out ROC AUC lost when a feature is shuffled",
            "",
        )
    )
    return out


def _monitoring(data: ReportData, settings: Settings) -> list[str]:
    evaluated = {}
    if data.model is not None:
        evaluated[data.model["version"]] = data.model["metrics"]["test"]["roc_auc"]
    monitoring: dict[str, Any] = data.status.features.get("monitoring") or {}
    flags = [
        f'<li class="flag">{escape(d["feature"])} (model {escape(d["model_version"])}, '
        f"{escape(d['day'])}): {escape('; '.join(d['reasons']))}</li>"
        for d in monitoring.get("drifting", [])
    ]
    flags += [
        f'<li class="flag">model {escape(q["model_version"])} on {escape(q["day"])}: ROC AUC '
        f"{q['roc_auc']:.3f} against {q['evaluation_roc_auc']:.3f} at evaluation</li>"
        for q in monitoring.get("falling_auc", [])
    ]
    if "error" in monitoring:
        flagged = (
            f'<p class="error">The flags could not be read: '
            f"{escape(redact(str(monitoring['error'])))}</p>"
        )
    elif not monitoring.get("built"):
        flagged = "<p>No monitoring marts yet: `lakehouse run` builds them from the log.</p>"
    elif flags:
        flagged = f"<ul>{''.join(flags)}</ul>"
    else:
        flagged = "<p>No drifting feature and no falling AUC are flagged.</p>"
    thresholds = {"numeric": settings.drift_psi, "categorical": settings.drift_js}
    return [
        "<h2>Model quality in production</h2>",
        _figure(
            "quality",
            charts.quality(data.quality, evaluated),
            "per model version and day of serving, on the predictions whose outcome is known "
            "(gold.model_quality_daily)",
            "no outcomes yet: predictions need decisions in the source, then `lakehouse run`",
        ),
        "<h2>Drift</h2>",
        flagged,
        _figure(
            "drift",
            charts.drift(data.drift, thresholds, settings.monitor_min_count),
            f"PSI (numeric, threshold {settings.drift_psi:g}) or Jensen-Shannon distance "
            f"(categorical, threshold {settings.drift_js:g}) of served features against the "
            "training set (gold.feature_drift_daily)",
            "no predictions logged yet: serve, then `lakehouse run`",
        ),
    ]


def write(text: str, output: Path) -> Path:
    """Write the page atomically, readable by its owner only (it holds the lake's data)."""
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        msg = f"cannot write the report to {output}: the folder {folder} does not exist"
        raise LakehouseError(msg)
    handle, tmp = tempfile.mkstemp(prefix=f".{output.name}.", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return output.resolve()

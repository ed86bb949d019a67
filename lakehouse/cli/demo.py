"""`lakehouse demo`: embedded Postgres, seed, the Luigi pipeline and a summary, in one command."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from lakehouse import catalog, sql
from lakehouse.errors import LakehouseError
from lakehouse.pipeline import run_pipeline
from lakehouse.settings import Settings
from lakehouse.source import schema
from lakehouse.source.embedded import EmbeddedPostgres
from lakehouse.source.seed import seed
from lakehouse.storage import Storage

SAMPLE_QUERY = """
SELECT loan_intent,
       sum(applications) AS applications,
       sum(approved) AS approved,
       round(sum(approved) / nullif(sum(decided), 0), 3) AS approval_rate
FROM gold.approval_rate_daily
GROUP BY loan_intent
ORDER BY approval_rate DESC
"""


def demo(
    settings: Settings,
    *,
    rows: int,
    workers: int = 1,
    say: Callable[[str], None] = print,
    debug: bool = False,
) -> None:
    """Run the whole batch lakehouse on embedded defaults and print what it holds."""
    t0 = time.monotonic()
    storage = Storage.from_settings(settings)
    storage.check()
    say(f"lakehouse demo: tables in {storage.root}")
    if settings.embedded_pg:
        step = time.monotonic()
        pg = EmbeddedPostgres(settings)
        started = pg.start()
        state = "started" if started else "already running"
        say(f"[1/4] Postgres {state} at {pg.public_url()} ({time.monotonic() - step:.1f}s)")
    else:
        say("[1/4] Postgres from LAKEHOUSE_PG_DSN")
    step = time.monotonic()
    with schema.connect(settings) as conn:
        seeded = seed(conn, settings.pg_schema, rows=rows, seed=settings.repeatable_seed)
        conn.commit()
    if seeded.skipped:
        say(
            f"[2/4] source already seeded: {seeded.applicants:,} applicants, "
            f"{seeded.applications:,} applications (use `lakehouse seed --reset` to reload)"
        )
    else:
        say(
            f"[2/4] seeded {seeded.applicants:,} applicants and {seeded.applications:,} "
            f"applications with COPY ({time.monotonic() - step:.1f}s)"
        )
    say("[3/4] running the Luigi pipeline (bronze -> silver -> gold -> Feast -> model)")
    run = run_pipeline(workers=workers, progress=say, debug=debug, record=storage)
    if run.ran:
        say(f"      {len(run.ran)} tasks ran in {run.seconds:.1f}s")
    else:
        say("      nothing to do: bronze, silver and gold are up to date with the source")
    say("[4/4] summary")
    say("")
    tables = catalog.describe(storage)
    result = sql.QueryResult(
        ["table", "version", "rows", "size"],
        [
            (f"{t.zone}.{t.name}", t.version, t.rows, catalog.human_size(t.size_bytes))
            for t in tables
        ],
    )
    say(sql.render(result).rstrip())
    say("")
    rejects = sql.run_query(
        settings,
        storage,
        "SELECT 'applicants' AS source, _rule AS rule, count(*) AS rejected "
        "FROM silver.applicants_rejected GROUP BY ALL "
        "UNION ALL SELECT 'loan_applications', _rule, count(*) "
        "FROM silver.loan_applications_rejected GROUP BY ALL ORDER BY 1, 3 DESC",
    )
    say("Rejected rows by rule (silver.<table>_rejected):")
    say(sql.render(rejects).rstrip())
    say("")
    say("Sample query: approval rate by loan intent (gold.approval_rate_daily)")
    say(sql.render(sql.run_query(settings, storage, SAMPLE_QUERY)).rstrip())
    say("")
    from lakehouse.ml import models

    version, _ = models.load(storage)
    entry = next(e for e in models.describe(storage) if e["version"] == version)
    say(f"Model {models.MODEL} {version} (models/{models.MODEL}/{version}/):")
    say("  " + models.summary(entry["metrics"]))
    say("")
    application_id, answer = _predict_through_api(settings, storage)
    say(f'Prediction through the API: POST /predict {{"application_id": {application_id}}}')
    say(
        f"  -> {answer['decision']} (probability {answer['probability']:.3f}, "
        f"model {answer['model_version']})"
    )
    if settings.prediction_log == "on":
        say(f"  logged in bronze.predictions as request {answer['request_id']}")
        say(f"  explain it: lakehouse predictions explain {answer['request_id']}")
        _monitoring_marts(settings, storage)
    say("")
    report = _report(settings, storage)
    say(f"Report (rows, rejects, freshness, the model, quality, drift): {report}")
    say("")
    say(
        f'Done in {time.monotonic() - t0:.1f}s. Try: lakehouse sql "SELECT * FROM '
        'gold.application_features LIMIT 5", or `lakehouse serve`'
    )


def _monitoring_marts(settings: Settings, storage: Storage) -> None:
    """Build the monitoring marts over the prediction just logged (as `lakehouse run` would)."""
    from lakehouse.ml.monitor import drift  # noqa: F401 - provides the drift references
    from lakehouse.transforms.gold import MONITORING
    from lakehouse.zones import gold

    for name in MONITORING:  # in dependency order: outcomes before quality
        gold.build(settings, storage, name)


def _report(settings: Settings, storage: Storage) -> str:
    """Write `<home>/report.html`; return its path."""
    from lakehouse.report import data, page

    written = page.write(
        page.render(data.collect(settings, storage), settings), settings.home / "report.html"
    )
    return str(written)


def _predict_through_api(settings: Settings, storage: Storage) -> tuple[int, dict[str, Any]]:
    """Serve the API on a free local port, ask for one prediction over HTTP, stop."""
    import json
    import threading
    import urllib.error
    import urllib.request

    import uvicorn

    from lakehouse.ml.serve import create_app
    from lakehouse.source.embedded import free_port

    row = sql.run_query(
        settings,
        storage,
        "SELECT max(application_id) FROM silver.loan_applications WHERE loan_status IS NULL",
    ).rows[0][0]
    if row is None:
        row = sql.run_query(
            settings, storage, "SELECT max(application_id) FROM silver.loan_applications"
        ).rows[0][0]
    application_id = int(row)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline:
                msg = (
                    "the prediction API did not start within 30 s; rerun `lakehouse demo` (the "
                    "machine may be busy) or start `lakehouse serve` to see why"
                )
                raise LakehouseError(msg)
            time.sleep(0.05)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/predict",
            data=json.dumps({"application_id": application_id}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - localhost
                answer: dict[str, Any] = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = json.loads(exc.read() or b"{}").get("detail", exc.reason)
            msg = f"the prediction API answered {exc.code}: {detail}"
            raise LakehouseError(msg) from None
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    return application_id, answer

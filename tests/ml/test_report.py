"""`lakehouse report` in a real headless browser (Debian's chromium), on local disk and S3.

The page is written by the command from a lake with a model, logged predictions with
outcomes, and the monitoring marts built; chromium then loads it from disk. The test
holds it to what a self-contained report must be: no script and no request beyond the
file itself, no console message or uncaught error, every plot present with a size, and
every plot's area of the full-page screenshot actually painted (not blank).
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import polars as pl

from lakehouse.ml import tasks as ml_tasks
from lakehouse.ml.monitor import drift  # noqa: F401 - provides the drift references
from lakehouse.transforms.gold import MONITORING
from lakehouse.zones import gold
from tests import browser
from tests.conftest import env_for
from tests.helpers import read
from tests.ml.conftest import Lake, served_model

ROOT = Path(__file__).resolve().parents[2]
PLOTS = {
    "rows-applicants",
    "rows-loan_applications",
    "freshness",
    "roc",
    "calibration",
    "importances",
    "quality",
    "drift",
}


class _Links(HTMLParser):
    """Every URL-valued attribute and every script element of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.scripts += 1
        for name, value in attrs:
            if name in ("src", "href", "xlink:href", "action", "data") and value is not None:
                self.urls.append(value)


def write_report(lake: Lake, output: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        **env_for(lake.settings),
        "PYTHONPATH": str(ROOT),
        "LAKEHOUSE_MONITOR_MIN_COUNT": "20",
    }
    done = subprocess.run(
        [sys.executable, "-m", "lakehouse.cli", "report", "--output", str(output)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def painted_share(png: bytes, box: dict[str, float], ratio: float) -> float:
    """Return the share of a box's pixels in the screenshot that are not white."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("L")
    crop = image.crop(
        (
            int(box["x"] * ratio),
            int(box["y"] * ratio),
            int((box["x"] + box["width"]) * ratio),
            int((box["y"] + box["height"]) * ratio),
        )
    )
    pixels = list(crop.getdata())
    return sum(1 for p in pixels if p < 235) / max(1, len(pixels))


def test_the_report_renders_every_plot_in_a_real_browser(lake: Lake, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from lakehouse.ml.serve import create_app

    served_model(lake)
    ml_tasks.materialize(lake.settings, lake.storage)
    online = set(read(lake.storage, "gold", "application_features")["application_id"].to_list())
    decided = read(lake.storage, "silver", "loan_applications").filter(
        pl.col("loan_status").is_not_null() & pl.col("application_id").is_in(list(online))
    )
    asked = [
        int(i)
        for status in (0, 1)
        for i in decided.filter(pl.col("loan_status") == status)["application_id"][:30]
    ]
    with TestClient(create_app(lake.settings)) as client:  # its lifespan lands the log
        for app in asked:
            assert client.post("/predict", json={"application_id": app}).status_code == 200
    for name in MONITORING:
        gold.build(lake.settings, lake.storage, name)

    output = tmp_path / "report.html"
    done = write_report(lake, output)
    assert f"report written to {output}" in done.stderr + done.stdout
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    html = output.read_text()
    links = _Links()
    links.feed(html)
    assert links.scripts == 0
    assert all(u.startswith(("#", "data:")) for u in links.urls), links.urls
    assert lake.settings.s3_secret_access_key.get() not in html or not lake.settings.is_s3

    page = browser.load(output, "figure[data-plot]")
    assert page.console == []
    fetched = [u for u in page.requests if not u.startswith("data:")]  # inline images
    assert fetched == [output.resolve().as_uri()], fetched
    shown = {b["name"]: b for b in page.boxes}
    assert set(shown) == PLOTS, shown
    for name, box in shown.items():
        assert box["svg"] and not box["empty"], name
        assert box["width"] > 200 and box["height"] > 100, box
        share = painted_share(page.screenshot, box, page.device_pixel_ratio)
        assert share > 0.02, f"{name}: only {share:.1%} of its area is painted"
    screenshot = tmp_path / "report.png"
    screenshot.write_bytes(page.screenshot)
    keep = os.environ.get("TEST_ARTIFACTS")
    if keep:  # by hand: look at what the browser showed
        Path(keep).mkdir(parents=True, exist_ok=True)
        where = "s3" if lake.settings.is_s3 else "local"
        shutil.copy(screenshot, Path(keep) / f"report-{where}.png")

"""keybus bench's report.html rendered in headless Chromium (Debian's ``chromium``): the
charts are drawn (SVG in the DOM, colours on the screenshot) and the page logs nothing
to the console. The report is made from synthetic rows of every kind of side (memory,
Kafka and NATS with their raw baselines), so no broker is needed.

``make test`` installs chromium when it is missing (tools/chromium.sh, called by
tools/run-tests.sh, which sets KEYBUS_CHROMIUM); elsewhere the test is skipped without it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from keybus.bench.output import write_outputs
from keybus.bench.results import Row

CHARTS = ("throughput", "latency", "overhead", "resources")
# Bar colours of the charts (keybus on Kafka, on NATS; a resource's peak and after close).
COLOURS = {"kafka": (31, 119, 180), "nats": (44, 160, 44), "peak": (255, 127, 14)}


@pytest.fixture(scope="module")
def chromium() -> str:
    required = os.environ.get("KEYBUS_CHROMIUM")
    if required is not None:  # under `make test`: tools/chromium.sh was to install it
        if not (os.path.isabs(required) and os.access(required, os.X_OK)):
            pytest.fail(f"chromium should have been installed by tools/chromium.sh: {required}")
        return required
    found = shutil.which("chromium")
    if found is None:
        pytest.skip("chromium is not installed (`make test` installs it: tools/chromium.sh)")
    return found


def _run(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",  # we may be root, in a container
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: no name resolves
            "--enable-logging=stderr",
            "--v=0",
            *args,
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )


def _console(stderr: bytes) -> list[str]:
    """What the page wrote to the console (Chromium logs each message as CONSOLE)."""
    return [line for line in stderr.decode(errors="replace").splitlines() if ":CONSOLE" in line]


def _rows() -> list[Row]:
    rows = []
    for level, messages in (("low", 500), ("medium", 2000)):
        for repeat in (1, 2):
            sides = [("memory", "keybus", 40_000.0)]
            sides += [("kafka", "keybus", 9000.0), ("kafka", "raw", 11_000.0)]
            sides += [("nats", "keybus", 12_000.0), ("nats", "raw", 10_000.0)]
            for backend, client, rate in sides:
                row = Row(backend, client, level, repeat, messages, messages // 10, 5, 3, 100, 0)
                row.delivered, row.duplicates = messages, 1 if backend == "nats" else 0
                row.throughput, row.publish_rate = rate * repeat, rate * 1.2
                row.latency_ms = {"p50": 4.0 * repeat, "p95": 9.0, "p99": 12.0, "max": 30.0}
                row.envelope_latency_ms = dict(row.latency_ms)
                row.cpu_s_per_1k = 0.05
                row.rss_mb = {"before": 50.0, "peak": 61.0, "after": 55.0}
                row.resources = {
                    "tasks": {"before": 0, "peak": 260, "after": 0},
                    "threads": {"before": 1, "peak": 3, "after": 1},
                    "native_threads": {"before": 1, "peak": 17, "after": 1},
                    "fds": {"before": 8, "peak": 31, "after": 8},
                }
                rows.append(row)
    return rows


def _environment() -> dict[str, object]:
    return {
        "cpu_count": 2,
        "cpu_model": "test CPU",
        "load_average_start": [0.5, 0.4, 0.3],
        "load_average_end": [0.6, 0.4, 0.3],
        "python": "CPython 3.11",
        "clients": {"keybus": "0.1.0"},
        "brokers": {},
        "settings": {},
    }


def test_the_report_draws_its_charts_in_chromium_without_console_messages(
    chromium: str, tmp_path: Path
) -> None:
    out = tmp_path / "bench"
    meta = {"command": "keybus bench --raw", "started_at": "t0", "finished_at": "t1"}
    paths = write_outputs(out, _rows(), _environment(), meta)
    assert set(CHARTS) <= paths.keys()
    url = paths["html"].resolve().as_uri()
    profile = tmp_path / "profile"

    dom = _run(chromium, profile, "--dump-dom", url)
    assert _console(dom.stderr) == []
    page = dom.stdout.decode()
    for chart in CHARTS:
        figure = re.search(rf"<figure id=\"chart-{chart}\">(.*?)</figure>", page, re.S)
        assert figure, f"chart {chart} is missing from the DOM"
        assert "<svg" in figure.group(1)
        assert figure.group(1).count("<path") > 20, f"chart {chart} has nothing drawn"
    assert "4,446" in page

    shot = tmp_path / "shot.png"
    screenshot = _run(chromium, profile, "--window-size=1280,4200", f"--screenshot={shot}", url)
    assert _console(screenshot.stderr) == []
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 4200)
    colours = image.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 50, "a blank page has a handful of colours"
    counts = {rgb: n for n, rgb in colours}
    for name, rgb in COLOURS.items():
        assert counts.get(rgb, 0) > 500, f"no {name} bars on the screenshot"


def test_the_console_check_sees_what_a_page_logs(chromium: str, tmp_path: Path) -> None:
    """The check above is only as good as the capture: a page that logs must be seen."""
    page = tmp_path / "noisy.html"
    page.write_text("<!DOCTYPE html><p>x</p><script>console.error('boom'); nope();</script>")
    result = _run(chromium, tmp_path / "profile", "--dump-dom", page.as_uri())
    logged = "\n".join(_console(result.stderr))
    assert "boom" in logged
    assert "nope is not defined" in logged

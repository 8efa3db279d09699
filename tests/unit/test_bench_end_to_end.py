"""`keybus bench` end to end on the memory backend: the command runs, results.json has
the rows, the report is one self-contained page, and the exit code says whether every
row was ok.

The command runs as a subprocess, as from a shell: each of its rows is its own leak
check (everything a run opened is gone after close(), by identity, polled to a
deadline), which these tests assert; and this process is not left holding what
drawing a report keeps for good (matplotlib's font files, numpy's BLAS threads)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from keybus.cli.app import app

ROW_KEYS = {
    "backend",
    "level",
    "messages",
    "aggregates",
    "topics",
    "partitions",
    "delivered",
    "lost",
    "duplicates",
    "order_violations",
    "publish_rate",
    "throughput",
    "latency_ms",
    "cpu_s_per_1k",
    "rss_mb",
    "leftovers",
    "ok",
}
NOTHING_LEFT = {"tasks": 0, "threads": 0, "native_threads": 0, "fds": 0}
# Anything a page would fetch: script/img/iframe sources, stylesheets and the like.
EXTERNAL = re.compile(r"""(?:src|href|xlink:href)\s*=\s*["']?\s*(?:https?:)?//""", re.I)


def _bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keybus", "bench", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def _results(out: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((out / "results.json").read_text())
    return document


def test_a_low_level_bench_on_memory_writes_ok_rows_and_a_self_contained_report(
    tmp_path: Path,
) -> None:
    result = _bench("--backends", "memory", "--levels", "low", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "low" in result.stdout
    assert "left after" in result.stdout

    document = _results(tmp_path)
    [row] = document["rows"]
    assert row.keys() >= ROW_KEYS
    assert (row["backend"], row["client"], row["level"]) == ("memory", "keybus", "low")
    assert (row["messages"], row["aggregates"], row["topics"], row["partitions"]) == (
        500,
        50,
        5,
        3,
    )
    assert (row["delivered"], row["lost"], row["order_violations"]) == (500, 0, 0)
    assert row["ok"] is True
    assert row["publish_rate"] > 0
    assert row["throughput"] > 0
    latency = row["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    assert row["leftovers"] == NOTHING_LEFT, row["leftover_report"]
    assert row["rss_mb"]["peak"] >= row["rss_mb"]["before"] > 0
    assert row["cpu_s_per_1k"] > 0
    env = document["environment"]
    assert env["cpu_count"] >= 1
    assert {"python", "clients", "brokers", "settings", "load_average_end"} <= env.keys()
    assert document["command"].startswith("keybus bench --backends memory --levels low")
    [entry] = document["summary"]
    assert entry["ok"]
    assert entry["runs"] == 1

    page = (tmp_path / "report.html").read_text()
    assert not EXTERNAL.search(page), EXTERNAL.search(page)
    assert "<script" not in page
    assert page.count("<svg") == 3  # throughput, latency, resources (no raw on memory)
    assert "4,446" in page, "the Go SDK's figure stands next to keybus's"
    for chart in ("throughput", "latency", "resources"):
        assert (tmp_path / f"{chart}.png").read_bytes().startswith(b"\x89PNG")


def test_a_broker_that_does_not_answer_is_skipped_and_memory_runs_instead(
    tmp_path: Path,
) -> None:
    dead = {"KEYBUS_NATS_URL": "nats://127.0.0.1:9"}  # the discard port: nothing listens
    args = ["--backends", "nats", "--messages", "200", "--aggregates", "20", "--no-warmup"]
    result = _bench(*args, "--out", str(tmp_path), env=dead)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nats: skipped" in result.stdout
    assert "nats://127.0.0.1:9" in result.stdout
    assert "running on memory" in result.stdout
    [row] = _results(tmp_path)["rows"]
    assert (row["backend"], row["level"], row["messages"], row["ok"]) == (
        "memory",
        "custom",
        200,
        True,
    )


def test_a_run_that_times_out_is_a_failed_row_and_a_non_zero_exit(tmp_path: Path) -> None:
    # 50 aggregates x 2 versions, each handler call taking 1 s: the second version of
    # each aggregate cannot be handled within the 1.5 s bound.
    args = ["--backends", "memory", "--messages", "100", "--aggregates", "50"]
    args += ["--handler-ms", "1000", "--timeout", "1.5", "--no-warmup", "--out", str(tmp_path)]
    result = _bench(*args)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED" in result.stdout
    [row] = _results(tmp_path)["rows"]
    assert row["ok"] is False
    # The counts when the bound struck; the row's own counts also take in what close()
    # let the running handlers finish.
    found = re.match(r"timeout after 1.5 s: 100 published, (\d+) of 100 handled", row["error"])
    assert found, row["error"]
    assert 0 < int(found.group(1)) <= 50, "first versions only"
    assert row["lost"] == 100 - row["delivered"]
    assert row["leftovers"] == NOTHING_LEFT, row["leftover_report"]
    assert "FAILED" in (tmp_path / "report.html").read_text()


def test_unknown_levels_and_backends_are_refused(tmp_path: Path) -> None:
    for args in (["--levels", "huge"], ["--backends", "redis"]):
        result = CliRunner().invoke(app, ["bench", *args, "--out", str(tmp_path)])
        assert result.exit_code == 2, result.output
        assert "unknown" in result.output
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    "module", ["keybus", "keybus.bench.session", "keybus.bench.raw", "keybus.cli.app"]
)
def test_matplotlib_is_loaded_only_to_draw_a_report(module: str) -> None:
    """`import keybus` loads neither the command line's libraries nor matplotlib; the
    bench and the CLI load matplotlib only when they write a report."""
    probe = (
        f"import sys, {module}\n"
        "heavy = ('matplotlib', 'PIL') + (('rich', 'typer') if "
        f"{module!r} == 'keybus' else ())\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stdout

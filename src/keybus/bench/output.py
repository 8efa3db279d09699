"""What a bench leaves in its output directory: ``results.json``, ``report.html`` and
the charts as PNGs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from keybus.bench.results import Row, write_json

__all__ = ["write_outputs"]


def write_outputs(
    out: Path, rows: Sequence[Row], environment: dict[str, Any], meta: dict[str, Any]
) -> dict[str, Path]:
    """Write everything; return the paths by kind (``json``, ``html``, chart names)."""
    from keybus.bench.charts import write_charts  # matplotlib: only when a report is made
    from keybus.bench.report_html import render_report

    out.mkdir(parents=True, exist_ok=True)
    document = write_json(out / "results.json", rows, environment, meta)
    svgs = write_charts(document["summary"], out) if rows else {}
    (out / "report.html").write_text(render_report(document, svgs), encoding="utf-8")
    paths = {"json": out / "results.json", "html": out / "report.html"}
    return paths | {name: out / f"{name}.png" for name in svgs}

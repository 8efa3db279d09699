"""``report.html``: one self-contained page (inline CSS and SVG, no script, nothing
fetched), readable offline and shareable as one file."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from typing import Any

from keybus.bench.charts import CHARTS
from keybus.bench.format import leftovers, long_series, number, series, spread_text, verdict

__all__ = ["GO_SDK", "render_report"]

WHEN = ("before", "peak", "after")

GO_SDK = {
    "leaked_goroutines": 4446,
    "initial": 3,
    "peak": 4449,
    "final": 4449,
    "why": "it read the goroutine count before its deferred Close() ran; counted after "
    "Close (plus a wait and a GC), the count went back to the initial value",
    "throughput": "33, 133, 166 and 333 msg/s for 500, 2000, 5000 and 10000 messages: "
    "exactly N divided by the fixed 15 or 30 s sleep after sending, so it measured the sleep",
}

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;
max-width:1200px;padding:0 1rem;color:#222;line-height:1.45}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2.2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
th,td{border:1px solid #ddd;padding:.25rem .45rem;text-align:right;white-space:nowrap}
th{background:#f4f4f4}td.l,th.l{text-align:left}
.ok{color:#1a7f37;font-weight:600}.bad{color:#c62828;font-weight:600}
.callout{display:flex;gap:1rem;flex-wrap:wrap;margin:1rem 0}
.card{flex:1 1 300px;border:1px solid #ddd;border-radius:6px;padding:.8rem 1rem}
.card .big{font-size:2.2rem;font-weight:700}.go .big{color:#c62828}.kb .big{color:#1a7f37}
figure{margin:1rem 0}figure svg{max-width:100%;height:auto}
figcaption{font-size:.85rem;color:#555}pre{background:#f7f7f7;padding:.7rem;overflow:auto;
font-size:.8rem}.scroll{overflow-x:auto}
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], left: int = 2) -> str:
    """Cells are already escaped markup; the first ``left`` columns align left."""

    def cells(tag: str, values: Sequence[str]) -> str:
        return "".join(
            f"<{tag}{' class=l' if i < left else ''}>{v}</{tag}>" for i, v in enumerate(values)
        )

    body = "".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
    return f"<div class=scroll><table><tr>{cells('th', head)}</tr>{body}</table></div>"


def _verdict_cell(ok: bool, text: str) -> str:
    return f"<span class={'ok' if ok else 'bad'}>{_e(text)}</span>"


def _summary_table(summary: Sequence[Mapping[str, Any]]) -> str:
    head = ["level", "side", "verdict", "messages", "aggregates", "lost / dup / order"]
    head += ["publish msg/s", "end-to-end msg/s", "p50 ms", "p95 ms", "p99 ms", "max ms"]
    head += ["CPU s / 1k msg", "broker CPU s / 1k", "RSS MB before → peak → after"]
    head += ["left after close", "keybus / raw"]
    rows = []
    for e in summary:
        latency = e["latency_ms"]
        rows.append(
            [
                _e(e["level"]),
                _e(long_series(e["backend"], e["client"])),
                _verdict_cell(e["ok"], verdict(e)),
                _e(number(e["messages"])),
                _e(number(e["aggregates"])),
                _e(f"{e['lost']} / {e['duplicates']} / {e['order_violations']}"),
                _e(spread_text(e["publish_rate"])),
                _e(spread_text(e["throughput"])),
                *(_e(spread_text(latency[p], 1)) for p in ("p50", "p95", "p99", "max")),
                _e(spread_text(e["cpu_s_per_1k"], 3)),
                _e(spread_text(e["broker_cpu_s_per_1k"], 3)),
                _e(" → ".join(number(e["rss_mb"][w]["median"]) for w in WHEN)),
                _e(leftovers(e["leftovers"])),
                _e(spread_text(e["overhead_vs_raw"], 2) if e["overhead_vs_raw"] else ""),
            ]
        )
    return _table(head, rows)


def _runs_table(rows: Sequence[Mapping[str, Any]]) -> str:
    head = ["level", "side", "repeat", "ok", "delivered", "lost", "dup", "order"]
    head += ["publish msg/s", "end-to-end msg/s", "p99 ms", "envelope p99 ms", "CPU s/1k"]
    head += ["tasks", "threads", "native threads", "fds", "error"]

    def res(row: Mapping[str, Any], kind: str) -> str:
        r = row["resources"][kind]
        return _e(f"{r['before']} → {r['peak']} → {r['after']}")

    body = [
        [
            _e(r["level"]),
            _e(series(r["backend"], r["client"])),
            _e(r["repeat"]),
            _verdict_cell(r["ok"], "ok" if r["ok"] else "FAILED"),
            _e(number(r["delivered"])),
            _e(r["lost"]),
            _e(r["duplicates"]),
            _e(r["order_violations"]),
            _e(number(r["publish_rate"])),
            _e(number(r["throughput"])),
            _e(number(r["latency_ms"]["p99"], 1)),
            _e(number(r["envelope_latency_ms"]["p99"], 1)),
            _e(number(r["cpu_s_per_1k"], 3)),
            *(res(r, k) for k in ("tasks", "threads", "native_threads", "fds")),
            _e(r["error"] or r["cleanup_error"] or ""),
        ]
        for r in rows
    ]
    return _table(head, body)


def _go_sdk(rows: Sequence[Mapping[str, Any]]) -> str:
    keybus_rows = [r for r in rows if r["client"] == "keybus"] or list(rows)
    left = {k: max(r["leftovers"][k] for r in keybus_rows) for k in keybus_rows[0]["leftovers"]}
    peak_tasks = max(r["resources"]["tasks"]["peak"] for r in keybus_rows)
    peak_native = max(r["resources"]["native_threads"]["peak"] for r in keybus_rows)
    total = sum(left.values())
    return f"""
<div class=callout>
 <div class="card go"><div>Go SDK comparison test, "leaked goroutines"</div>
  <div class=big>{GO_SDK["leaked_goroutines"]:,}</div>
  <div>initial {GO_SDK["initial"]}, peak {GO_SDK["peak"]:,}, "final" {GO_SDK["final"]:,} — the
  same at every level. Wrong because {_e(GO_SDK["why"])}.</div></div>
 <div class="card kb"><div>keybus, left after <code>close()</code> returned (worst of
  {len(keybus_rows)} runs)</div>
  <div class=big>{total}</div>
  <div>{_e(", ".join(f"{v} {k.replace('_', ' ')}" for k, v in left.items()))} — counted by
  identity (which task, thread, native thread, fd) against the snapshot taken before the
  run, polled until a deadline, never after a fixed sleep. At the peak the runs held up to
  {peak_tasks:,} asyncio tasks and {peak_native} native threads.</div></div>
</div>
<p>The Go test's throughput ({_e(GO_SDK["throughput"])}) is why every rate here comes from
real timestamps: publish rate = messages / (last ack &minus; first publish), end-to-end
throughput = messages / (last handled &minus; first publish).</p>"""


def _figure(name: str, svg: str) -> str:
    return f"<figure id=chart-{name}>{svg}<figcaption>{_e(CHARTS[name])}</figcaption></figure>"


def render_report(document: Mapping[str, Any], svgs: Mapping[str, str]) -> str:
    rows, summary, env = document["rows"], document["summary"], document["environment"]
    all_ok = all(r["ok"] for r in rows)
    failures = [r for r in rows if not r["ok"]]
    cpu = f"{env['cpu_count']} x {env['cpu_model']}"
    charts = "".join(_figure(name, svg) for name, svg in svgs.items())
    if "overhead" not in svgs:
        charts += "<p>No raw-client baseline in this run (<code>--raw</code> adds one).</p>"
    failure_html = "".join(
        f"<h3>{_e(r['level'])} / {_e(series(r['backend'], r['client']))} "
        f"(repeat {r['repeat']})</h3><pre>{_e(r['error'] or '')}\n{_e(r['leftover_report'])}</pre>"
        for r in failures
    )
    return f"""<!DOCTYPE html>
<html lang=en><head><meta charset=utf-8>
<meta name=viewport content="width=device-width, initial-scale=1">
<title>keybus bench: Kafka vs NATS vs memory</title><style>{_CSS}</style></head><body>
<h1>keybus bench: Kafka vs NATS JetStream vs memory</h1>
<p><code>{_e(document["command"])}</code><br>{_e(document["started_at"])} →
{_e(document["finished_at"])} on {_e(cpu)}, load average {_e(env["load_average_start"])} →
{_e(env["load_average_end"])}.
Verdict: {_verdict_cell(all_ok, "every run ok" if all_ok else f"{len(failures)} run(s) FAILED")}
(ok = everything delivered, no order violation, nothing left after close).</p>
<h2>What the numbers mean — and do not</h2>
<ul>
<li>One process publishes and consumes; the brokers run on the same machine
({_e(env["cpu_count"])} CPUs{", shared with other work" if env["cpu_count"] <= 4 else ""}), so
client, broker and harness compete for the same cores. Compare sides within this report;
absolute figures say little about a cluster.</li>
<li>Each aggregate has one publisher sending versions 1..n in order, each publish awaiting
its ack (so at most one message in flight per aggregate); aggregate i goes to topic i % topics.</li>
<li>Latency is per message, from just before the publish call (and from the envelope's
timestamp) to the start of its handler, as p50/p95/p99/max; duplicates, losses and order
violations are counted separately.</li>
<li>The raw baselines move the same bytes, keys and headers with the plain client and one
ordered lane per partition, but none of the bus's guarantees (no decoding, no
per-aggregate lanes, no done-prefix commits, retries or dead letters, no bounded close).
keybus / raw below 1 is the price of those.</li>
<li>CPU is this process's (all its threads, librdkafka's included) from the first publish to
the last handled message, per 1,000 messages; broker CPU is the local broker process's over
the same window.</li>
</ul>
<h2>Resources after close: the Go SDK's figure next to keybus's</h2>
{_go_sdk(rows)}
<h2>Charts</h2>
{charts}
<h2>Summary (medians over repeats, min&ndash;max in brackets)</h2>
{_summary_table(summary)}
<h2>Every run</h2>
{_runs_table(rows)}
{"<h2>Failures</h2>" + failure_html if failures else ""}
<h2>Environment</h2>
<pre>{_e(json.dumps(env, indent=2))}</pre>
</body></html>
"""

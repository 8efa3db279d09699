"""A traced consumer in a process of its own, for the cross-process tracing test::

    python -m tests.trace_proc URL TOPIC GROUP

Connects with ``tracing=`` (an SDK provider of its own, spans kept in memory), prints
``ready`` once subscribed, and for the first envelope it handles one JSON line (flushed)
with what the handler saw: the current span's trace id and span id, the trace id the
envelope carries, and the finished attempt span's parent span id and attributes. Then
it closes its bus and exits.
"""

from __future__ import annotations

import asyncio
import json
import sys


async def main(url: str, topic: str, group: str) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import keybus

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    seen: asyncio.Queue[dict[str, object]] = asyncio.Queue()

    async def handler(envelope: keybus.Envelope) -> None:
        context = trace.get_current_span().get_span_context()
        await seen.put(
            {
                "trace_id": format(context.trace_id, "032x"),
                "span_id": format(context.span_id, "016x"),
                "envelope_trace_id": envelope.trace_id,
            }
        )

    async with keybus.connect(url, group=group, tracing=provider) as bus:
        await bus.subscribe_envelope(topic, handler)
        print("ready", flush=True)
        report = await asyncio.wait_for(seen.get(), 60)
        # The attempt's span ends right after the handler returns.
        for _ in range(200):
            spans = [s for s in exporter.get_finished_spans() if s.name == f"{topic} process"]
            if spans:
                break
            await asyncio.sleep(0.01)
        span = spans[0]
        report["parent_span_id"] = format(span.parent.span_id, "016x") if span.parent else None
        report["parent_remote"] = bool(span.parent and span.parent.is_remote)
        report["attributes"] = dict(span.attributes or {})
        print(json.dumps(report), flush=True)
    provider.shutdown()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))

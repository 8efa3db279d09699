"""The ``keybus`` command line."""

from __future__ import annotations

import asyncio
import sys

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from keybus.bench.report import results_table
from keybus.bench.scenario import aggregates_for, backend_url, run_scenario
from keybus.cli.bench import bench
from keybus.cli.dlq import dlq
from keybus.cli.health import health
from keybus.cli.lag import lag
from keybus.cli.publish import publish
from keybus.cli.run import run
from keybus.cli.tail import tail
from keybus.cli.topics import topics

app = typer.Typer(add_completion=False, help="keybus: an asyncio event bus.")
console = Console()


app.command()(bench)
app.command()(run)
app.add_typer(dlq, name="dlq")
# Looking at topics (each in its own module).
for command in (tail, publish, topics, lag, health):
    app.command()(command)


@app.callback()
def _root() -> None:
    """keybus: an asyncio event bus over Kafka, NATS JetStream and memory."""


@app.command()
def version() -> None:
    """Print the keybus version."""
    from keybus import __version__

    console.print(__version__)


@app.command()
def demo(
    backend: str = typer.Option(
        "memory", help="memory, kafka or nats (KEYBUS_KAFKA_URL / KEYBUS_NATS_URL apply)."
    ),
    url: str = typer.Option("", help="A backend URL instead (memory://, kafka://, nats://)."),
    messages: int = typer.Option(20_000, min=1, help="Envelopes to publish."),
    topics: int = typer.Option(5, min=1, help="Topics the aggregates spread over."),
    aggregates: int = typer.Option(0, min=0, help="Aggregates (0: messages/10 in 50..1000)."),
    max_delay_ms: float = typer.Option(2.0, min=0, help="Random handler delay, up to (ms)."),
    fail_rate: float = typer.Option(
        0.02, min=0, max=1, help="Share of first attempts that fail (retried in place)."
    ),
) -> None:
    """Many aggregates publish versions concurrently; handlers sleep at random; the bus keeps
    each aggregate in order. Prints what was delivered, order, latency and resources."""
    count = aggregates or aggregates_for(messages)
    url = url or backend_url(backend)
    console.print(
        f"[bold]keybus demo[/bold] on {url}: {messages} envelopes, {count} aggregates, "
        f"{topics} topics, handlers sleeping 0-{max_delay_ms:g} ms, "
        f"{fail_rate:.0%} of first attempts failing"
    )
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task("delivered", total=messages)

        def advance(done: int) -> None:
            if done % 100 == 0 or done == messages:
                bar.update(task, completed=done)

        result = asyncio.run(
            run_scenario(
                url,
                messages,
                topics=topics,
                aggregates=count,
                max_delay=max_delay_ms / 1000,
                fail_rate=fail_rate,
                progress=advance,
            )
        )
    console.print(results_table([result], "result (resources counted after close returned)"))
    if result.leftovers:
        console.print(f"[red]{result.leftovers}[/red]")
    if not result.ok:
        raise typer.Exit(1)


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()

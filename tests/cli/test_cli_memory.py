"""The CLI in this process (typer's runner) on memory://, whose broker lives while the
test holds it: usage errors, error lines, --config, and the tail's choice of records."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from keybus.cli.app import app
from keybus.cli.tail import _Picker
from keybus.message import Message
from keybus.testing import LeakChecker
from keybus.transports.memory import MemoryBroker


@pytest.fixture
def broker() -> MemoryBroker:
    """A memory broker the test keeps alive across the commands (each connects anew)."""
    return MemoryBroker.named("cli-unit")


def invoke(*args: str, stdin: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), input=stdin)
    return result.exit_code, result.output


def test_topics_create_list_describe_delete(broker: MemoryBroker, no_leaks: LeakChecker) -> None:
    url = "memory://cli-unit"
    assert invoke("topics", url, "create", "orders", "--partitions", "4")[0] == 0
    code, out = invoke("topics", url, "create", "orders", "--partitions", "4")
    assert code == 1
    assert "exists already (4 partitions)" in out
    code, out = invoke("topics", url, "list", "--json")
    assert code == 0
    assert json.loads(out) == {"topics": ["orders"]}
    code, out = invoke("topics", url, "describe", "orders", "--json")
    assert code == 0
    assert json.loads(out)["partitions"] == 4
    assert invoke("topics", url, "delete", "orders")[0] == 0
    code, out = invoke("topics", url, "describe", "orders")
    assert code == 1
    assert "no such topic" in out
    assert "Traceback" not in out


def test_publish_prints_what_was_acknowledged(broker: MemoryBroker, no_leaks: LeakChecker) -> None:
    url = "memory://cli-unit"
    assert invoke("topics", url, "create", "events", "--partitions", "2")[0] == 0
    lines = '{"n": 1}\n\n{"n": 2}\n'
    code, out = invoke(
        "publish", url, "events", "--envelope", "--aggregate-id", "a-1", "--type", "Made",
        "--version", "5", "--json", stdin=lines,
    )  # fmt: skip
    assert code == 0, out
    acked = [json.loads(line) for line in out.splitlines()]
    assert [a["event_version"] for a in acked] == [5, 6], "blank lines skipped, versions +1"
    assert {a["key"] for a in acked} == {"a-1"}
    assert sum(len(log.records) for log in broker.topics["events"].logs) == 2
    code, out = invoke("publish", url, "events", "--envelope", "--aggregate-id", "a", "--type",
                       "T", "not json")  # fmt: skip
    assert code == 1
    assert "line 1 is not JSON" in out


def test_a_command_leaves_the_logging_set_up_as_it_was(
    broker: MemoryBroker, no_leaks: LeakChecker
) -> None:
    library = logging.getLogger("keybus")
    before = (library.propagate, list(library.handlers))
    assert invoke("topics", "memory://cli-unit", "list")[0] == 0
    assert (library.propagate, list(library.handlers)) == before


def test_usage_errors_exit_2() -> None:
    assert invoke("tail", "memory://x")[0] == 2  # no topic
    assert invoke("tail", "memory://x", "t", "--from-beginning", "--last", "3")[0] == 2
    assert invoke("tail", "memory://x", "t", "--group", "g", "--last", "3")[0] == 2
    assert invoke("topics", "memory://x", "create", "t")[0] == 2  # no --partitions
    assert invoke("topics", "memory://x", "frobnicate")[0] == 2
    assert invoke("publish", "memory://x", "t", "--envelope", "{}")[0] == 2
    assert invoke("publish", "memory://x", "t", "--header", "novalue", "v")[0] == 2
    assert invoke("lag", "memory://x")[0] == 2  # no --group
    assert invoke("health")[0] == 2  # neither URL nor --config


def test_an_invalid_topic_name_is_one_line_not_a_traceback(
    broker: MemoryBroker, no_leaks: LeakChecker
) -> None:
    code, out = invoke("topics", "memory://cli-unit", "describe", "no/slashes")
    assert code == 2
    assert "invalid topic" in out
    assert "Traceback" not in out


def test_health_with_a_config_file_instead_of_a_url(tmp_path: Path, no_leaks: LeakChecker) -> None:
    config = tmp_path / "keybus.toml"
    config.write_text('url = "memory://cli-config"\n')
    code, out = invoke("health", "--config", str(config), "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["ok"] is True
    assert report["checks"]["broker"]["ok"] is True
    # With --config the URL is left out: the positional arguments shift.
    code, out = invoke("topics", "--config", str(config), "list", "--json")
    assert code == 0, out
    code, out = invoke("health", "memory://x", "--config", str(config))
    assert code == 2, "a URL and --config"


def _message(partition: int, offset: int) -> Message:
    return Message("t", b"", partition=partition, offset=offset)


def test_picker_shows_the_newest_of_each_partitions_backlog_in_offset_order() -> None:
    picker = _Picker({0: (4, 4), 1: (1, 1)}, keep=2)
    shown: list[tuple[int, int]] = []
    # Delivered in key order, not offset order; then a record published after the start.
    for partition, offset in [(0, 1), (0, 3), (1, 0), (0, 0), (0, 2), (0, 4)]:
        shown += [(m.partition, m.offset) for m in picker.offer(_message(partition, offset))]
    assert shown == [(1, 0), (0, 2), (0, 3), (0, 4)]


def test_picker_new_only_and_everything() -> None:
    new_only = _Picker({0: (2, 2)}, keep=0)
    assert [new_only.offer(_message(0, o)) for o in (0, 1)] == [[], []]
    assert [m.offset for m in new_only.offer(_message(0, 2))] == [2]
    everything = _Picker({0: (2, 2)}, keep=float("inf"))
    assert [[m.offset for m in everything.offer(_message(0, o))] for o in (1, 0, 2)] == [
        [1],
        [0],
        [2],
    ]


def test_picker_never_drops_a_new_record_when_the_count_overstates() -> None:
    # NATS-like: stream sequences shared by partitions (end 10 for both); the count says
    # 3 old records in partition 0 but only 2 are read (one expired meanwhile).
    picker = _Picker({0: (3, 10), 1: (0, 10)}, keep=2)
    assert picker.offer(_message(0, 4)) == []
    assert picker.offer(_message(0, 7)) == []
    assert [m.offset for m in picker.offer(_message(1, 10))] == [10]
    assert [m.offset for m in picker.offer(_message(0, 11))] == [4, 7, 11]
    assert picker.offer(_message(0, 5)) == [], "old, after the partition's were shown"
    new_only = _Picker({0: (5, 6)}, keep=0)
    assert [m.offset for m in new_only.offer(_message(0, 6))] == [6]

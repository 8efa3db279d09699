"""On a real broker, keybus puts every key on the partition the Go services' sarama
producer picks (tests/golden/go_sdk/sarama-partitions.tsv), so an aggregate published by
both sides stays on one partition, in order."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import keybus
from keybus.testing import LeakChecker
from tests.conftest import Backend
from tests.helpers import Collected, eventually

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "go_sdk" / "sarama-partitions.tsv"


async def test_every_golden_key_lands_where_sarama_puts_it(
    no_leaks: LeakChecker, backend: Backend
) -> None:
    expected: dict[int, dict[str, int]] = defaultdict(dict)
    for row in GOLDEN.read_text().splitlines()[1:]:
        key, partitions, partition = row.split("\t")
        expected[int(partitions)][key] = int(partition)
    async with keybus.connect(backend.url) as bus:
        for partitions, keys in sorted(expected.items()):
            topic = backend.topic(f"sarama{partitions}")
            await bus.ensure_topic(topic, keybus.TopicConfig(partitions=partitions))
            got = Collected()
            sub = await bus.subscribe(topic, got)
            for key in keys:
                await bus.publish(topic, key.encode(), key=key)
            expected_count = len(keys)
            await eventually(
                lambda got=got, n=expected_count: len(got) >= n, what=f"{expected_count} records"
            )
            placed = {m.key: m.partition for m in got}
            wrong = {k: (placed[k], want) for k, want in keys.items() if placed[k] != want}
            assert not wrong, f"{partitions} partitions: (keybus, sarama) {wrong}"
            await sub.unsubscribe()

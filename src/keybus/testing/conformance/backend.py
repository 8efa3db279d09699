"""The backend under test, as the suite sees it: where it is, what it can do, and the
topics a test made there (deleted when the test ends)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest

import keybus
from keybus.testing.conformance.features import Features
from keybus.testing.conformance.helpers import key_on

__all__ = ["Backend", "unique"]


def unique(label: str) -> str:
    """A fresh topic/group name, so tests never see each other's data."""
    return f"kb-{label}-{uuid.uuid4().hex[:10]}"


@dataclass
class Backend:
    """One backend under test; ``url`` is shared by every bus of one test.

    ``unreachable_url``: a URL of the backend's scheme that nothing answers (e.g. a port
    nothing listens on), for the connect-error test; None skips it (memory has none)."""

    name: str
    url: str
    features: Features = field(default_factory=Features)
    unreachable_url: str | None = None
    topics: list[str] = field(default_factory=list)

    @classmethod
    def at(
        cls, url: str, features: Features | None = None, unreachable_url: str | None = None
    ) -> Backend:
        """A backend named after its URL's scheme."""
        return cls(urlsplit(url).scheme, url, features or Features(), unreachable_url)

    def topic(self, label: str = "t") -> str:
        """A fresh topic name, deleted with its dead-letter topic when the test ends."""
        name = unique(label)
        self.topics.append(name)
        self.topics.append(f"{name}.dlq")
        return name

    def require(self, *flags: str) -> None:
        """Skip the calling test unless the backend declares every one of ``flags``."""
        for flag in flags:
            if flag not in Features.flags():
                raise ValueError(f"unknown feature {flag!r}: use {sorted(Features.flags())}")
            if not getattr(self.features, flag):
                pytest.skip(f"{self.name} does not declare the feature {flag!r}")

    def key_on(self, partition: int, partitions: int) -> str:
        """A key this backend puts on ``partition`` of a topic with ``partitions``."""
        return key_on(partition, partitions, self.features.partition_for)

    async def drop_topics(self) -> None:
        """Delete every topic made with :meth:`topic`, and their dead-letter topics."""
        if not self.topics:
            return
        # A subscription to a dead-letter topic made its own: "<topic>.dlq.dlq".
        doomed = dict.fromkeys(t for name in self.topics for t in (name, f"{name}.dlq"))
        async with keybus.connect(self.url) as admin:
            for topic in doomed:
                await admin.delete_topic(topic)

"""Which topics use the Go SDK's NATS layout, and which stream holds such a topic — pure,
tested without a server (``tests/unit/test_nats_layout.py``).

keybus's own layout spreads a topic over partition subjects ``kb.<token>.<p>`` of a
stream ``KB_<token>`` (:mod:`.names`). The Go SDK's services (jxt-core
``sdk/pkg/eventbus``) publish an envelope to the subject named exactly like the topic,
into a stream they name from their config ``JetStream.Stream`` (``Name``, ``Subjects``;
defaults ``BUSINESS_STREAM`` on ``business.>``): that stream when it exists and its
subjects cover the topic, else a stream of the topic's own, ``<Name>_<topic with . as
_>`` on the subject ``<topic>``. A topic in the *subject layout* lives exactly there, so
a Go service with the same config meets it, whichever side starts first: :meth:`
SubjectLayout.stream_for` is that rule. Such a topic is one subject, so one partition.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "GO_DEFAULT_STREAM",
    "GO_DEFAULT_SUBJECTS",
    "SubjectLayout",
    "SubjectTopics",
    "subject_matches",
]

GO_DEFAULT_STREAM = "BUSINESS_STREAM"
"""The Go SDK's default ``JetStream.Stream.Name``."""
GO_DEFAULT_SUBJECTS = ("business.>",)
"""The Go SDK's default ``JetStream.Stream.Subjects``."""

# What JetStream refuses in a stream name (it becomes a subject token and a directory).
_BAD_STREAM = re.compile(r"[\s.*>/\\]")
# A subject pattern: tokens of printable non-space characters, "*" and ">" whole tokens.
_TOKEN = re.compile(r"[^\s.*>]+|\*|>")


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether the NATS subject ``pattern`` (``*``: one token, ``>``: one or more at the
    end) matches ``subject`` — the server's rule, used to tell whether a stream's subjects
    cover a topic and which configured pattern a topic falls under."""
    wanted, tokens = pattern.split("."), subject.split(".")
    for i, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > i
        if i >= len(tokens) or (token != "*" and token != tokens[i]):
            return False
    return len(tokens) == len(wanted)


def _check_pattern(pattern: str, what: str) -> str:
    tokens = pattern.split(".")
    if not all(_TOKEN.fullmatch(t) for t in tokens) or ">" in tokens[:-1]:
        raise ValueError(f"invalid {what} {pattern!r}: a NATS subject or subject pattern")
    return pattern


@dataclass(frozen=True, slots=True)
class SubjectLayout:
    """Topics laid out as a Go service with ``JetStream.Stream`` config ``Name=stream``,
    ``Subjects=subjects`` lays them out (the defaults are the Go SDK's): the subject is
    the topic, and the stream is ``stream`` if the server's ``stream`` covers the topic
    (created with ``subjects`` when missing and they cover it, as the Go service creates
    it at start-up), else ``<stream>_<topic with . as _>`` on the subject ``<topic>``.

    To attach to a stream someone else made, name it here (with ``subjects`` covering
    the topic); a stream of another name that already stores the topic's subject makes
    creating one fail with the server's error (``subjects overlap``, JetStream error
    10065), which keybus reports naming that stream."""

    stream: str = GO_DEFAULT_STREAM
    subjects: tuple[str, ...] = GO_DEFAULT_SUBJECTS

    def __post_init__(self) -> None:
        if not isinstance(self.stream, str) or not self.stream or _BAD_STREAM.search(self.stream):
            raise ValueError(
                f"invalid stream name {self.stream!r}: no spaces, '.', '*', '>', '/' or '\\'"
            )
        if isinstance(self.subjects, str) or not all(isinstance(s, str) for s in self.subjects):
            raise TypeError("subjects must be a tuple of subject patterns")
        object.__setattr__(self, "subjects", tuple(self.subjects))
        for subject in self.subjects:
            _check_pattern(subject, "subject")

    def covers(self, topic: str) -> bool:
        """Whether the configured ``subjects`` store the topic's subject."""
        return any(subject_matches(s, topic) for s in self.subjects)

    def topic_stream(self, topic: str) -> str:
        """The stream of the topic's own: ``<stream>_<topic with . as _>`` (the Go SDK's
        name; note that ``a.b`` and ``a_b`` share it, as they do in Go)."""
        return f"{self.stream}_{topic.replace('.', '_')}"


class SubjectTopics:
    """The ``subject_topics`` option: which topics use the subject layout, and which
    :class:`SubjectLayout` each. Given as a mapping of topic patterns (a topic name, or a
    NATS subject pattern over the topic's ``.``-separated tokens: ``business.>``, ``>``
    for every topic) to layouts, or as patterns alone (each with the default layout). A
    topic takes the layout of its exact name if listed, else of the first pattern that
    matches it, in the order given."""

    __slots__ = ("_exact", "_patterns")

    def __init__(self, given: Mapping[str, SubjectLayout] | Iterable[str] | None = None) -> None:
        if given is None:
            given = {}
        elif isinstance(given, str):
            raise TypeError("subject_topics takes topic patterns (a list) or a mapping")
        elif not isinstance(given, Mapping):
            given = dict.fromkeys(given, SubjectLayout())
        self._exact: dict[str, SubjectLayout] = {}
        self._patterns: list[tuple[str, SubjectLayout]] = []
        for pattern, layout in given.items():
            if not isinstance(layout, SubjectLayout):
                raise TypeError(f"subject_topics[{pattern!r}] must be a SubjectLayout")
            _check_pattern(pattern, "topic pattern")
            if "*" in pattern.split(".") or pattern.endswith(">"):
                self._patterns.append((pattern, layout))
            else:
                self._exact[pattern] = layout

    def __bool__(self) -> bool:
        return bool(self._exact or self._patterns)

    def layout(self, topic: str) -> SubjectLayout | None:
        """The topic's layout, or ``None``: keybus's partitioned layout."""
        layout = self._exact.get(topic)
        if layout is not None:
            return layout
        for pattern, layout in self._patterns:
            if subject_matches(pattern, topic):
                return layout
        return None

    def __repr__(self) -> str:
        items = [*self._exact.items(), *self._patterns]
        return f"SubjectTopics({dict(items)!r})"

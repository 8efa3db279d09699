"""The NATS subject layout's rules (``keybus.transports.nats.layout``), without a server:
NATS subject matching, which topics use the layout (exact names before patterns, in the
order given), the stream names a Go service with the same config uses, and clear errors
for a bad option."""

from __future__ import annotations

import pytest

from keybus.transports.nats import NatsOptions, NatsTransport, SubjectLayout
from keybus.transports.nats.layout import SubjectTopics, subject_matches


@pytest.mark.parametrize(
    ("pattern", "subject", "matches"),
    [
        ("orders", "orders", True),
        ("orders", "orders.eu", False),
        ("business.>", "business.orders", True),
        ("business.>", "business.orders.eu", True),
        ("business.>", "business", False),  # ">" needs at least one token
        ("business.*", "business.orders", True),
        ("business.*", "business.orders.eu", False),
        ("*.orders", "eu.orders", True),
        (">", "orders", True),
        ("a.b", "a_b", False),
    ],
)
def test_subject_patterns_match_as_the_server_matches(
    pattern: str, subject: str, matches: bool
) -> None:
    assert subject_matches(pattern, subject) is matches


def test_the_go_sdks_stream_names() -> None:
    """Its configured stream for the topics it covers, ``<Name>_<topic, . as _>``
    otherwise (the defaults: ``BUSINESS_STREAM`` on ``business.>``)."""
    layout = SubjectLayout()
    assert (layout.stream, layout.subjects) == ("BUSINESS_STREAM", ("business.>",))
    assert layout.covers("business.orders")
    assert not layout.covers("orders.eu")
    assert layout.topic_stream("orders.eu") == "BUSINESS_STREAM_orders_eu"
    assert SubjectLayout(stream="SVC", subjects=["svc.>"]).subjects == ("svc.>",)


def test_exact_topics_win_over_patterns_and_patterns_go_in_order() -> None:
    own, svc, rest = SubjectLayout(stream="OWN"), SubjectLayout(stream="SVC"), SubjectLayout()
    topics = SubjectTopics({"svc.>": svc, "svc.orders": own, ">": rest})
    assert topics.layout("svc.orders") is own
    assert topics.layout("svc.payments") is svc
    assert topics.layout("anything") is rest
    assert SubjectTopics({"svc.*": svc}).layout("svc.a.b") is None  # keybus's layout
    listed = SubjectTopics(["orders", "audit.>"])
    assert listed.layout("orders") == SubjectLayout()
    assert listed.layout("audit.eu") == SubjectLayout()
    assert listed.layout("orders.eu") is None
    assert listed
    assert not SubjectTopics()
    assert not SubjectTopics(None)


def test_the_transport_takes_the_option_and_reports_bad_values_clearly() -> None:
    transport = NatsTransport("nats://127.0.0.1:1", subject_topics=["orders"])
    assert transport.options.layouts.layout("orders") == SubjectLayout()
    assert NatsOptions().layouts.layout("orders") is None
    with pytest.raises(ValueError, match="invalid stream name"):
        SubjectLayout(stream="a.b")
    with pytest.raises(ValueError, match="invalid subject"):
        SubjectLayout(subjects=("a.>.b",))
    with pytest.raises(TypeError, match="tuple of subject patterns"):
        SubjectLayout(subjects="orders")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="topic patterns"):
        NatsOptions(subject_topics="orders")
    with pytest.raises(TypeError, match="must be a SubjectLayout"):
        NatsOptions(subject_topics={"orders": "BUSINESS_STREAM"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="invalid topic pattern"):
        NatsOptions(subject_topics=["orders.>.eu"])

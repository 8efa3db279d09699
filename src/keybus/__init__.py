"""keybus: an asyncio event bus over Kafka, NATS JetStream and memory.

Per-aggregate order with concurrency across aggregates, at-least-once delivery with
retries in place and dead letters, and a bounded, leak-free close — on every backend.
"""

from keybus.bus import EventBus
from keybus.connect import connect
from keybus.envelope import Envelope
from keybus.errors import (
    BusClosedError,
    ConnectError,
    EnvelopeError,
    KeybusError,
    PublishError,
)
from keybus.message import Message
from keybus.subscription import SubscribeOptions, Subscription, SubscriptionStats
from keybus.transports.base import TopicConfig

__all__ = [
    "BusClosedError",
    "ConnectError",
    "Envelope",
    "EnvelopeError",
    "EventBus",
    "KeybusError",
    "Message",
    "PublishError",
    "SubscribeOptions",
    "Subscription",
    "SubscriptionStats",
    "TopicConfig",
    "connect",
]

__version__ = "0.1.0"

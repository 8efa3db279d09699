"""keybus: an asyncio event bus over Kafka, NATS JetStream and memory.

Per-aggregate order with concurrency across aggregates, at-least-once delivery with
retries in place and dead letters, and a bounded, leak-free close — on every backend.
"""

from keybus.bus import EventBus
from keybus.connect import Connector, connect
from keybus.deadline import Deadline
from keybus.delivery import Delivery, current_delivery
from keybus.envelope import Envelope
from keybus.errors import (
    BusClosedError,
    ConnectError,
    EnvelopeError,
    KeybusError,
    PublishError,
    SubscribeError,
    TopicError,
)
from keybus.message import Message
from keybus.middleware import CallNext, Middleware
from keybus.options import SubscribeOptions
from keybus.registry import register_transport
from keybus.stats import SubscriptionStats
from keybus.subscription import Subscription
from keybus.topics import TopicConfig, TopicInfo

__all__ = [
    "BusClosedError",
    "CallNext",
    "ConnectError",
    "Connector",
    "Deadline",
    "Delivery",
    "Envelope",
    "EnvelopeError",
    "EventBus",
    "KeybusError",
    "Message",
    "Middleware",
    "PublishError",
    "SubscribeError",
    "SubscribeOptions",
    "Subscription",
    "SubscriptionStats",
    "TopicConfig",
    "TopicError",
    "TopicInfo",
    "connect",
    "current_delivery",
    "register_transport",
]

__version__ = "0.1.0"

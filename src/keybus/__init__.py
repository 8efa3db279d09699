"""keybus: an asyncio event bus over Kafka, NATS JetStream and memory.

Per-aggregate order with concurrency across aggregates, at-least-once delivery with
retries in place and dead letters, and a bounded, leak-free close — on every backend.
"""

from keybus.app import App
from keybus.background import Background
from keybus.bus import EventBus
from keybus.connect import Connector, connect, connect_from_config
from keybus.deadline import Deadline
from keybus.delivery import Delivery, current_delivery
from keybus.envelope import Envelope
from keybus.errors import (
    BusClosedError,
    ConfigError,
    ConnectError,
    EnvelopeError,
    KeybusError,
    PublishBatchError,
    PublishError,
    ReplayError,
    SubscribeError,
    TopicError,
)
from keybus.health import Check, Health
from keybus.heartbeat import HeartbeatAlert, HeartbeatWatch
from keybus.lag import Lag, LagAlert, LagWatch, PartitionLag
from keybus.message import Message
from keybus.middleware import CallNext, Middleware
from keybus.options import SubscribeOptions
from keybus.parked_requests import ParkedRequest
from keybus.parking import PARKED_BEHIND, ParkedKey
from keybus.registry import register_transport
from keybus.security import SASL, TLS, Secret
from keybus.stats import HeldPartition, SubscriptionSnapshot, SubscriptionStats, WaitingKey
from keybus.subscription import Subscription
from keybus.topics import TopicConfig, TopicInfo

__all__ = [
    "PARKED_BEHIND",
    "SASL",
    "TLS",
    "App",
    "Background",
    "BusClosedError",
    "CallNext",
    "Check",
    "ConfigError",
    "ConnectError",
    "Connector",
    "Deadline",
    "Delivery",
    "Envelope",
    "EnvelopeError",
    "EventBus",
    "Health",
    "HeartbeatAlert",
    "HeartbeatWatch",
    "HeldPartition",
    "KeybusError",
    "Lag",
    "LagAlert",
    "LagWatch",
    "Message",
    "Middleware",
    "ParkedKey",
    "ParkedRequest",
    "PartitionLag",
    "PublishBatchError",
    "PublishError",
    "ReplayError",
    "Secret",
    "SubscribeError",
    "SubscribeOptions",
    "Subscription",
    "SubscriptionSnapshot",
    "SubscriptionStats",
    "TopicConfig",
    "TopicError",
    "TopicInfo",
    "WaitingKey",
    "connect",
    "connect_from_config",
    "current_delivery",
    "register_transport",
]

__version__ = "0.1.0"

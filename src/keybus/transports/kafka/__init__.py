"""The Kafka transport, on confluent-kafka (librdkafka).

One job per module; imports point one way (transport -> admin, producer, topic_feed;
topic_feed -> group_consumer -> headers, threads, config; producer -> threads, config;
config -> security; admin -> failures; all -> errors)::

    transport.py       KafkaTransport: connect, publish/send, consumer(), close
    admin.py           the admin client: connect probe, topic create/describe/delete
    group_consumer.py  the shared librdkafka consumer of one group and its thread:
                       subscription changes, consume loop, backpressure, rebalances, commits
    topic_feed.py      KafkaConsumer, the per-topic Consumer the core sees, and its feeder
    producer.py        the idempotent producer, served from the event loop (no thread)
    headers.py         a consumed record's headers, read lazily
    threads.py         the threads we start, and the bounded wait for their end
    config.py          options, librdkafka defaults, the bootstrap servers from the URL
    security.py        tls= / sasl= / URL credentials -> librdkafka's security settings
    failures.py        what librdkafka said about a failed connection (the probe's cause)
    errors.py          confluent-kafka's errors translated into keybus's

Threads: one per group consumer (joined at close) and a short-lived one to destroy the
producer; the producer itself and the admin client need none of ours (the admin client's
futures are completed by librdkafka's background thread). Every handle is destroyed at
close, so librdkafka's native threads are gone afterwards. Design: docs/kafka.md.
"""

from keybus.transports.kafka.config import bootstrap_servers
from keybus.transports.kafka.transport import KafkaTransport

__all__ = ["KafkaTransport", "bootstrap_servers"]

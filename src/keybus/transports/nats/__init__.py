"""The NATS JetStream transport (``nats://host:port``); design and options in
``docs/nats.md``.

One job per module, imports pointing one way (``transport -> group -> partition_feed,
group_state, client, names, headers, errors``):

* :mod:`.transport` — :class:`NatsTransport`: connect/close, topics, publishing, consumers
* :mod:`.client` — the nats-py connection, its callbacks and bounded close; the
  :class:`~.client.Connection` a group member uses instead of the transport
* :mod:`.publisher` — pipelined publishing, one future per pending PubAck
* :mod:`.group` — a consumer group member: rebalance rounds, giving up and taking partitions
* :mod:`.group_state` — the typed group state, its changes and the compare-and-set loop
* :mod:`.bucket` — the group-state bucket on the server
* :mod:`.partition_feed` — one owned partition: pulling, the gap check, acks
* :mod:`.streams` — the stream behind a topic, in either layout: find, create, delete
* :mod:`.layout` — the Go SDK's subject layout (``subject_topics``): which topics, which stream
* :mod:`.names`, :mod:`.headers` — names on the server, the header codec
* :mod:`.errors` — NATS failures as keybus errors
* :mod:`.options` — :class:`NatsOptions`
"""

from keybus.transports.nats.headers import decode_headers, encode_headers
from keybus.transports.nats.layout import SubjectLayout
from keybus.transports.nats.options import NatsOptions
from keybus.transports.nats.transport import NatsTransport

__all__ = ["NatsOptions", "NatsTransport", "SubjectLayout", "decode_headers", "encode_headers"]

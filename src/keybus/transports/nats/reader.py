"""``Transport.read_topic`` on NATS: a topic's messages as its stream holds them now,
read through an ephemeral pull consumer that acknowledges nothing and is deleted after
(the server also drops it once idle, should the delete not arrive).

"Now" is the stream's last sequence when the read begins: a message published later is
not read. Retention may remove messages while the read runs (a stream's ``max_msgs`` or
``max_age``, another subject's messages pushing the topic's out of a shared stream), so
the read never counts on getting what it saw pending at the start: it asks the consumer
what is still pending before each fetch, and ends when nothing is, or at the last
sequence."""

from __future__ import annotations

import contextlib

import nats.js.errors
from nats.js import JetStreamContext, api

from keybus.deadline import Deadline
from keybus.message import Message
from keybus.transports.nats.client import Stream
from keybus.transports.nats.errors import NATS_ERRORS
from keybus.transports.nats.headers import decode_headers

__all__ = ["read_topic"]

_BATCH = 256
_FETCH_WAIT = 1.0  # s: a fetch that finds nothing (retention removed it meanwhile) asks again
_IDLE = 10.0  # seconds after which the server deletes a reader left behind


async def read_topic(
    js: JetStreamContext, topic: str, stream: Stream, deadline: Deadline
) -> list[Message]:
    """Every message of the topic behind ``stream`` (partition after partition, each in
    stream order). Raises ``TimeoutError`` at ``deadline``, or the client's error."""
    last = (await js.stream_info(stream.name)).state.last_seq or 0
    if not last:
        return []
    partition = {subject: p for p, subject in enumerate(stream.subjects)}
    config = api.ConsumerConfig(
        ack_policy=api.AckPolicy.NONE,
        deliver_policy=api.DeliverPolicy.ALL,
        inactive_threshold=_IDLE,
        **(
            {"filter_subject": stream.subjects[0]}
            if len(stream.subjects) == 1
            else {"filter_subjects": list(stream.subjects)}
        ),
    )
    sub = await js.pull_subscribe(stream.subjects[0], stream=stream.name, config=config)
    by_partition: dict[int, list[Message]] = {p: [] for p in range(len(stream.subjects))}
    try:
        done = False
        while not done:
            pending = (await sub.consumer_info()).num_pending or 0
            if not pending:
                break
            remaining = deadline.remaining()
            if remaining <= 0:
                raise TimeoutError
            try:
                fetched = await sub.fetch(min(_BATCH, pending), timeout=min(remaining, _FETCH_WAIT))
            except TimeoutError:  # (nats-py's: nothing came) see what is pending now
                continue
            for msg in fetched:
                meta = msg.metadata
                if meta.sequence.stream > last:  # published after the read began
                    done = True
                    break
                key, headers = decode_headers(msg)
                p = partition.get(msg.subject, 0)
                by_partition[p].append(
                    Message(
                        topic,
                        msg.data,
                        key,
                        headers,
                        p,
                        meta.sequence.stream,
                        meta.timestamp.timestamp() if meta.timestamp else None,
                    )
                )
                # (num_pending: what the consumer had left after this one, when sent)
                if meta.sequence.stream == last or not meta.num_pending:
                    done = True
                    break
    finally:
        with contextlib.suppress(*NATS_ERRORS, nats.js.errors.NotFoundError):
            await sub.unsubscribe()
        with contextlib.suppress(*NATS_ERRORS, nats.js.errors.NotFoundError):
            if config.name:  # pull_subscribe named the ephemeral
                await js.delete_consumer(stream.name, config.name)
    return [m for p in sorted(by_partition) for m in by_partition[p]]

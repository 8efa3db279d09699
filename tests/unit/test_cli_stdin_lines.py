"""``keybus publish``'s standard input, read off the loop: a stop ends the reading
while the input stays open, and what was already read still comes out."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator
from typing import BinaryIO

import pytest

from keybus.cli.lines import POLL, stdin_lines
from keybus.testing import LeakChecker


@pytest.fixture
def stdin_pipe(monkeypatch: pytest.MonkeyPatch) -> Iterator[BinaryIO]:
    """Standard input is a pipe's read end; the test gets the write end (open until it
    closes it)."""
    read_end, write_end = os.pipe()
    with open(read_end, encoding="utf-8") as reader, open(write_end, "wb", 0) as writer:
        monkeypatch.setattr(sys, "stdin", reader)
        yield writer


async def test_a_stop_ends_the_reading_while_the_input_stays_open(
    stdin_pipe: BinaryIO, no_leaks: LeakChecker
) -> None:
    stop = asyncio.Event()
    lines = stdin_lines(stop)
    stdin_pipe.write("één\r\ntwo\npartial".encode())
    assert await asyncio.wait_for(anext(lines), 5) == (1, "één")
    stop.set()  # "two" was read with "één": it still comes out, the unfinished line not
    assert await asyncio.wait_for(anext(lines), 5) == (2, "two")
    began = time.monotonic()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(lines), 5)
    assert time.monotonic() - began < POLL + 2.0, "the stop waited for more input"


async def test_a_stop_while_waiting_for_input_ends_within_the_poll(
    stdin_pipe: BinaryIO, no_leaks: LeakChecker
) -> None:
    stop = asyncio.Event()
    lines = stdin_lines(stop)
    waiting = asyncio.ensure_future(anext(lines))
    await asyncio.sleep(0)  # (let the read begin; it finds nothing, the input is open)
    stop.set()
    began = time.monotonic()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, 5)
    assert time.monotonic() - began < POLL + 2.0


async def test_the_last_line_without_its_end_counts_at_the_input_s_end(
    stdin_pipe: BinaryIO, no_leaks: LeakChecker
) -> None:
    stdin_pipe.write(b"a\n\nlast")
    stdin_pipe.close()
    read = [line async for line in stdin_lines(asyncio.Event())]
    assert read == [(1, "a"), (2, ""), (3, "last")]

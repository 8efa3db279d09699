"""A bus's background activities (heartbeats, heartbeat and lag watches): a stopped one
is no longer held by the bus, so a long-lived bus that starts and stops them over and
over does not grow."""

from __future__ import annotations

import keybus
from keybus.testing import LeakChecker

CYCLES = 200


async def test_many_start_stop_cycles_leave_the_bus_holding_only_what_runs(
    no_leaks: LeakChecker,
) -> None:
    async with keybus.connect("memory://background-cycles", group="g") as bus:
        kept = bus.start_heartbeat("beats", interval=60)
        await kept.ready()
        for _ in range(CYCLES):
            beat = bus.start_heartbeat("beats", interval=60)
            await beat.ready()
            watch = bus.watch_heartbeats("beats", interval=60, on_alert=lambda alert: None)
            await watch.ready()
            lag = bus.watch_lag(interval=60, on_change=lambda alert: None, topic="beats")
            await lag.ready()
            assert len(bus._background) == 4
            for handle in (beat, watch, lag):
                await handle.stop()
            await beat.stop()  # (idempotent: nothing held, nothing to drop twice)
        assert bus._background == {kept}, "stopped handles are still held"
    assert not kept.running

"""streamIdleTimeout's watch over a relayed stream: one timer per stream, not one per read."""

from __future__ import annotations

import asyncio

import pytest

from kvaware_scorer.gateway.relay import _IdleWatch


async def _read(watch: _IdleWatch, source: asyncio.Future[bytes]) -> str:
    """A relay's read: 'timeout' when the watch cancelled it, else what arrived."""
    loop = asyncio.get_running_loop()
    watch.last = loop.time()
    watch.reading = True
    try:
        data = await source
    except asyncio.CancelledError:
        if not watch.expired():
            raise
        return "timeout"
    finally:
        watch.reading = False
    return data.decode()


async def test_a_read_that_waits_past_the_timeout_ends_as_a_timeout() -> None:
    loop = asyncio.get_running_loop()

    async def relay() -> str:
        watch = _IdleWatch(loop, 0.1)
        try:
            return await _read(watch, loop.create_future())
        finally:
            watch.close()

    t0 = loop.time()
    assert await asyncio.wait_for(relay(), 2.0) == "timeout"
    assert 0.09 <= loop.time() - t0 < 1.0


async def test_reads_that_keep_coming_never_time_out() -> None:
    """Each read waits less than the timeout; together they last several timeouts."""
    loop = asyncio.get_running_loop()

    async def relay() -> list[str]:
        watch = _IdleWatch(loop, 0.1)
        got = []
        try:
            for i in range(8):
                source = loop.create_future()
                loop.call_later(0.05, source.set_result, str(i).encode())
                got.append(await _read(watch, source))
        finally:
            watch.close()
        return got

    assert await relay() == [str(i) for i in range(8)]


async def test_a_slow_client_between_reads_is_not_idle() -> None:
    """Time spent writing to a slow client (between reads) does not count."""
    loop = asyncio.get_running_loop()

    async def relay() -> str:
        watch = _IdleWatch(loop, 0.1)
        try:
            await asyncio.sleep(0.35)  # the write waited on the client
            source = loop.create_future()
            loop.call_later(0.05, source.set_result, b"late")
            return await _read(watch, source)
        finally:
            watch.close()

    assert await relay() == "late"


async def test_another_cancellation_is_not_taken_for_the_timeout() -> None:
    """A client that goes away cancels the relay; that cancellation propagates."""
    loop = asyncio.get_running_loop()
    started = asyncio.Event()

    async def relay() -> str:
        watch = _IdleWatch(loop, 0.2)
        try:
            source = loop.create_future()
            started.set()
            return await _read(watch, source)
        finally:
            watch.close()

    task = asyncio.ensure_future(relay())
    await started.wait()
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

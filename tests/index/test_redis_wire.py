"""The Redis backend's wire layer: error replies and pipelined replies read off the socket."""

from __future__ import annotations

import pytest
import redis
from redis._parsers.base import BaseParser

from kvaware_scorer.index.redis.resp import Wire, encode_command, error_reply
from tests.conftest import RedisProcess

# Error replies a script call can get (and a few it cannot), as the server words them.
_REPLIES = [
    "NOSCRIPT No matching script. Please use EVAL.",
    "LOADING Redis is loading the dataset in memory",
    "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
    "OOM command not allowed when used memory > 'maxmemory'.",
    "READONLY You can't write against a read only replica.",
    "MOVED 3999 127.0.0.1:6381",
    "ASK 3999 127.0.0.1:6381",
    "TRYAGAIN Multiple keys request during rehashing of slot",
    "CLUSTERDOWN The cluster is down",
    "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
    "CROSSSLOT Keys in request don't hash to the same slot",
    "NOPERM this user has no permissions to run the 'evalsha' command",
    "EXECABORT Transaction discarded because of previous errors.",
    "ERR user_script:12: KVAWARE too many tiers script: 0123, on @user_script:12.",
    "ERR unknown command 'FOO'",
    "WRONGTYPE Operation against a key holding the wrong kind of value",
]


@pytest.mark.parametrize("message", _REPLIES)
def test_error_replies_become_the_exceptions_redis_py_raises(message: str) -> None:
    """Same class and message as redis-py's own parser gives, so callers classify alike."""
    ours = error_reply(message)
    theirs = BaseParser.parse_error(message)  # type: ignore[no-untyped-call]
    assert type(ours) is type(theirs)
    assert str(ours) == str(theirs)


def test_pipelined_replies_of_every_kind_in_one_round_trip(redis_server: RedisProcess) -> None:
    """Several commands sent at once come back in order, errors as exception objects."""
    client = redis.Redis.from_url(redis_server.url)
    conn = client.connection_pool.get_connection()
    try:
        wire = Wire(conn)
        wire.send(
            b"".join(
                encode_command(c)
                for c in (
                    ("SET", "kvaware-wire-test", b"v\r\n1"),
                    ("GET", "kvaware-wire-test"),
                    ("GET", "kvaware-wire-missing"),
                    ("INCRBY", "kvaware-wire-n", 7),
                    ("EVALSHA", "0" * 40, 0),
                    ("EVAL", "return {1, 'a', {2}}", 0),
                    ("DEL", "kvaware-wire-test", "kvaware-wire-n"),
                )
            )
        )
        ok, got, missing, n, noscript, nested, deleted = wire.replies(7)
        assert (ok, got, missing, n) == (b"OK", b"v\r\n1", None, 7)
        assert isinstance(noscript, redis.exceptions.NoScriptError)
        assert nested == [1, b"a", [2]]
        assert deleted == 2
        # the connection is ready for the next round trip (replies were read whole)
        wire.send(encode_command(("PING",)))
        assert wire.replies(1) == [b"PONG"]
    finally:
        client.connection_pool.release(conn)
        client.close()

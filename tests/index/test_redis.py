"""The Redis backend against the shared contract, plus its roles, layout and failure behaviour."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import random
import signal
import subprocess
import sys
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from kvaware_scorer import ConfigError, Indexer, IndexerConfig
from kvaware_scorer.config import RedisIndexConfig
from kvaware_scorer.errors import BackendUnavailableError
from kvaware_scorer.index import InMemoryIndex, KVBlockIndex, TierTable, create_index
from kvaware_scorer.index.redis import RedisIndex, redis_url
from tests.conftest import RedisProcess, free_port
from tests.index.conftest import RedisClusterProcesses
from tests.index.contract import A, B, C, IndexContract, ehs, keys


def fresh_config(url: str, **kw: Any) -> RedisIndexConfig:
    # NOTE: tests of timeouts set their own; elsewhere a loaded machine must not turn a slow
    # bulk write into a buffered one.
    kw.setdefault("socket_timeout", 5.0)
    return RedisIndexConfig(address=url, key_prefix=f"t{uuid.uuid4().hex[:10]}:", **kw)


class TestRedisContract(IndexContract):
    @pytest.fixture
    def make_index(self, redis_server: RedisProcess) -> Iterator[Any]:
        made: list[RedisIndex] = []

        def factory(
            size: int = 1_000_000, pod_cache_size: int = 0, tiers: TierTable | None = None
        ) -> KVBlockIndex:
            cfg = fresh_config(redis_server.url, size=size, pod_cache_size=pod_cache_size)
            ix = RedisIndex(cfg, tiers=tiers)
            made.append(ix)
            return ix

        yield factory
        for ix in made:
            ix.close()


class TestRedisClusterContract(IndexContract):
    moves_engine_hashes = False  # see IndexContract.moves_engine_hashes and docs/redis.md

    @pytest.fixture
    def make_index(self, redis_cluster: Any) -> Iterator[Any]:
        made: list[RedisIndex] = []

        def factory(
            size: int = 1_000_000, pod_cache_size: int = 0, tiers: TierTable | None = None
        ) -> KVBlockIndex:
            cfg = fresh_config(
                redis_cluster.url, size=size, pod_cache_size=pod_cache_size, cluster=True
            )
            ix = RedisIndex(cfg, tiers=tiers)
            made.append(ix)
            return ix

        yield factory
        for ix in made:
            ix.close()


# -- helpers -------------------------------------------------------------------------------


def self_signed_certificate(cert: Path, key: Path) -> None:
    """Write a one-day self-signed certificate for 127.0.0.1 and its key (PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    pk = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    crt = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(pk.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(pk, hashes.SHA256())
    )
    cert.write_bytes(crt.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        pk.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )


def command_calls(url: str) -> dict[str, int]:
    info = redis.Redis.from_url(url).info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


def reset_stats(url: str) -> None:
    redis.Redis.from_url(url).config_resetstat()


def assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert set(got) == set(want)
    for pod, m in want.items():
        assert got[pod].blocks == m.blocks and dict(got[pod].tiers) == dict(m.tiers)
        assert got[pod].weight == pytest.approx(m.weight)


def wait_for(pred: Any, timeout: float = 5.0, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return bool(pred())


def indexer_config(url: str, prefix: str, **redis_cfg: Any) -> dict[str, Any]:
    return {
        "kvBlockIndexConfig": {"redisConfig": {"address": url, "keyPrefix": prefix, **redis_cfg}},
        "kvCacheBackendConfigs": [
            {"name": "gpu", "weight": 1.0},
            {"name": "cpu", "weight": 0.8},
        ],
    }


# -- layout and protocol ---------------------------------------------------------------------


def test_protocol_conformance(redis_server: RedisProcess) -> None:
    """RedisIndex satisfies the KVBlockIndex protocol."""
    ix = RedisIndex(fresh_config(redis_server.url))
    assert isinstance(ix, KVBlockIndex)
    ix.close()


def test_factory_builds_redis_and_valkey_backends(redis_server: RedisProcess) -> None:
    """redisConfig and valkeyConfig (valkey:// URL) both build a working Redis index."""
    valkey = redis_server.url.replace("redis://", "valkey://")
    for key, url in (("redisConfig", redis_server.url), ("valkeyConfig", valkey)):
        cfg = IndexerConfig.from_dict(
            {"kvBlockIndexConfig": {key: {"address": url, "keyPrefix": f"f{key}:"}}}
        )
        ix = create_index(cfg)
        assert isinstance(ix, RedisIndex) and ix.backend == "redis"
        ix.add(A, keys(2), ehs(2))
        assert ix.lookup(keys(2), [A])[A].blocks == 2
        ix.close()


@pytest.mark.parametrize(
    ("address", "url"),
    [
        ("valkey://h:1/2", "redis://h:1/2"),
        ("valkeys://h:1", "rediss://h:1"),
        ("rediss://u:p@h:1", "rediss://u:p@h:1"),
        ("unix:///redis/r.sock?db=1", "unix:///redis/r.sock?db=1"),
        ("10.0.0.5:6380", "redis://10.0.0.5:6380"),
    ],
)
def test_address_forms(address: str, url: str) -> None:
    """Configured addresses map to redis-py URLs (valkey schemes and host:port included)."""
    assert redis_url(address) == url


def test_config_rejects_unknown_scheme_and_braces() -> None:
    """Unknown URL schemes and hash-tag braces in the key prefix are configuration errors."""
    with pytest.raises(ConfigError, match="address"):
        IndexerConfig.from_dict({"kvBlockIndexConfig": {"redisConfig": {"address": "http://x"}}})
    with pytest.raises(ConfigError, match="keyPrefix"):
        IndexerConfig.from_dict({"kvBlockIndexConfig": {"redisConfig": {"keyPrefix": "a{b}"}}})


def test_db_number_isolates_indexes(redis_server: RedisProcess) -> None:
    """The configured database number overrides the URL's: equal prefixes in two databases
    are two indexes."""
    one = RedisIndex(RedisIndexConfig(address=redis_server.url, key_prefix="db:", db=3))
    two = RedisIndex(RedisIndexConfig(address=redis_server.url, key_prefix="db:", db=4))
    one.add(A, keys(2), ehs(2))
    assert one.lookup(keys(2), [A])[A].blocks == 2
    assert two.lookup(keys(2), [A]) == {}
    assert redis.Redis(port=redis_server.port, db=3).exists(b"db:c") == 1
    one.purge(A)
    one.close()
    two.close()


def test_unix_socket_and_password(redis_binary: str, tmp_path: Path) -> None:
    """A unix:// address with an ACL user and password reaches a protected server."""
    sock = tmp_path / "r.sock"
    server = RedisProcess(redis_binary, free_port(), tmp_path / "data", "--unixsocket", str(sock))
    server.start()
    admin = redis.Redis(port=server.port)
    admin.execute_command("ACL", "SETUSER", "kv", "on", ">kvpass", "~*", "&*", "+@all")
    admin.config_set("requirepass", "s3cret")
    try:
        for user, pw in ((None, "s3cret"), ("kv", "kvpass")):
            ix = RedisIndex(fresh_config(f"unix://{sock}", username=user, password=pw))
            ix.add(A, keys(3), ehs(3))
            assert ix.lookup(keys(3), [A])[A].blocks == 3
            ix.close()
        wrong = RedisIndex(fresh_config(f"unix://{sock}", password="nope"))
        with pytest.raises(BackendUnavailableError):
            wrong.lookup(keys(3), [A])
        wrong.close()
    finally:
        server.stop()


def test_tls_rediss(redis_binary: str, tmp_path: Path) -> None:
    """A rediss:// address talks TLS to a TLS-only server."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    self_signed_certificate(cert, key)
    port = free_port()
    server = RedisProcess(
        redis_binary,
        free_port(),
        tmp_path / "data",
        "--tls-port",
        str(port),
        "--tls-cert-file",
        str(cert),
        "--tls-key-file",
        str(key),
        "--tls-ca-cert-file",
        str(cert),
        "--tls-auth-clients",
        "no",
    )
    server.start()
    try:
        url = f"rediss://127.0.0.1:{port}?ssl_ca_certs={cert}&ssl_check_hostname=false"
        ix = RedisIndex(fresh_config(url, connect_timeout=2.0, socket_timeout=2.0))
        ix.add(A, keys(2), ehs(2))
        assert ix.lookup(keys(2), [A])[A].blocks == 2
        ix.close()
    finally:
        server.stop()


def test_lookup_is_one_call_with_server_side_early_stop(own_redis: RedisProcess) -> None:
    """A prompt lookup is one script call; a miss at block 0 reads one small chunk only."""
    ix = RedisIndex(fresh_config(own_redis.url))
    prompt = keys(512)
    ix.add(A, prompt, ehs(512))
    ix.lookup(prompt, [A])
    reset_stats(own_redis.url)
    assert ix.lookup(prompt, [A])[A].blocks == 512
    calls = command_calls(own_redis.url)
    assert calls["evalsha"] == 1 and calls["mget"] >= 4
    reset_stats(own_redis.url)
    assert ix.lookup(keys(512, base=10**9), [A]) == {}
    calls = command_calls(own_redis.url)
    assert calls["evalsha"] == 1 and calls["mget"] == 1
    ix.close()


def test_very_long_prompt(redis_server: RedisProcess) -> None:
    """A 10,000-block prompt (160k tokens) is walked and speculated in one call each."""
    ix = RedisIndex(fresh_config(redis_server.url))
    prompt = keys(10_000, base=7 * 10**9)
    ix.add(A, prompt[:9_000], ehs(9_000, 3 * 10**9))
    ix.add_speculative(B, prompt, ttl=30)
    res = ix.lookup(prompt, [A, B])
    assert res[A].blocks == 9_000 and res[B].blocks == 10_000
    ix.close()


def test_block_values_are_compact(redis_server: RedisProcess) -> None:
    """A block held by 16 pods at the default tier is a 3-byte header plus a byte per pod."""
    cfg = fresh_config(redis_server.url)
    ix = RedisIndex(cfg)
    pods = [f"10.9.0.{i}:8000" for i in range(16)]
    for i, p in enumerate(pods):
        ix.add(p, [42], [1000 + i])
    client = redis.Redis.from_url(redis_server.url)
    key = cfg.key_prefix.encode() + b"b" + (42).to_bytes(8, "little")
    assert len(client.get(key) or b"") == 3 + 16
    ix.add_tier(pods[0], [1000], "cpu")
    assert len(client.get(key) or b"") == 3 + 16 + 2
    assert len(ix.lookup([42], pods)) == 16
    ix.close()


def test_purge_walks_only_the_pods_reverse_index(own_redis: RedisProcess) -> None:
    """Purging a pod never scans the keyspace and leaves other pods' entries alone."""
    ix = RedisIndex(fresh_config(own_redis.url))
    ix.add(A, keys(20_000), ehs(20_000))
    ix.add(B, keys(10, base=10**9), ehs(10, 10**9))
    ix.add(B, keys(100), ehs(100, 5))
    reset_stats(own_redis.url)
    assert ix.purge(A) == 20_000
    calls = command_calls(own_redis.url)
    assert not {"keys", "scan"} & set(calls)
    assert calls["evalsha"] > 2  # begin, then several bounded steps
    st = ix.stats()
    assert st.entries == 110 and st.blocks == 110 and st.pods == 1
    assert ix.lookup(keys(100), [A, B]) == {B: ix.lookup(keys(100), [B])[B]}
    ix.close()


def test_batch_is_one_pipeline_with_results(redis_server: RedisProcess) -> None:
    """A write batch returns each operation's result in order and applies them all."""
    ix = RedisIndex(fresh_config(redis_server.url))
    with ix.batch() as b:
        b.add(A, keys(4), ehs(4))
        b.add(B, keys(2), ehs(2, 50))
        b.add_tier(A, ehs(2) + [5], "cpu")
        b.remove(B, ehs(1, 50) + [7])
    assert b.results == [None, None, 1, 1]
    res = ix.lookup(keys(4), [A, B])
    assert res[A].blocks == 4 and dict(res[A].tiers) == {"gpu": 4}
    assert B not in res
    assert ix.remove(A, ehs(2)) == 2
    assert dict(ix.lookup(keys(4), [A])[A].tiers) == {"cpu": 2, "gpu": 2}
    ix.close()


# -- expiry ----------------------------------------------------------------------------------


def test_quiet_pod_ages_out_without_purge(redis_server: RedisProcess) -> None:
    """A pod that stops writing disappears after the TTL and its entries are purged by the
    writer's maintenance, while a pod that keeps writing stays."""
    ix = RedisIndex(fresh_config(redis_server.url, ttl_seconds=1.0, maintenance_interval=0.2))
    ix.add(A, keys(5), ehs(5))
    ix.add(B, keys(5), ehs(5, 100))
    assert set(ix.lookup(keys(5))) == {A, B}
    t_end = time.monotonic() + 1.6
    i = 0
    while time.monotonic() < t_end:
        ix.add(B, [10**6 + i], [10**7 + i])
        assert ix.lookup(keys(5), [B])[B].blocks == 5  # keeps the shared blocks walked
        i += 1
        time.sleep(0.1)
    assert set(ix.lookup(keys(5), [A, B])) == {B}
    assert ix.pods() == [B]
    assert wait_for(lambda: ix.stats().extra["quiet_pods_purged"] >= 1, timeout=3)
    assert ix.purge(A) == 0  # already gone
    singles = [10**6 + j for j in range(i)]
    held = sum(1 for k in singles if ix.lookup([k], [B]))  # B's own, some already expired
    assert ix.stats().entries == 5 + held
    ix.close()


def test_quiet_pod_that_writes_again_starts_afresh(redis_server: RedisProcess) -> None:
    """A pod quiet for the TTL is gone even before any maintenance ran (no writer ran in
    between, e.g. the ingest process was down): its next write or removal does not bring its
    old entries back, and its old engine hashes no longer resolve."""
    cfg = fresh_config(redis_server.url, ttl_seconds=1.0, maintenance_interval=3600)
    old = RedisIndex(cfg)
    old.add(A, keys(4), ehs(4))
    old.add(B, keys(4), ehs(4, 100))
    old.close()
    time.sleep(1.3)
    ix = RedisIndex(cfg)
    assert ix.resolve(A, ehs(4)[0]) is None
    ix.add(A, keys(2), ehs(2))  # vLLM stored blocks 0-1 again after restarting
    assert ix.references(A) == {"gpu": {h: 1 for h in ehs(2)}}
    assert ix.remove(A, ehs(2)) == 2
    assert A not in ix.lookup(keys(4), [A])
    assert ix.remove(B, ehs(1, 100)) == 0  # B's removal finds nothing of its old run
    assert ix.lookup(keys(4)) == {}
    ix.maintain()
    st = ix.stats()
    assert st.entries == 0 and st.blocks == 0
    ix.close()


def test_blocks_not_walked_expire_while_walked_ones_stay(redis_server: RedisProcess) -> None:
    """Blocks neither written nor walked by a lookup for the TTL are swept; walked ones stay."""
    ix = RedisIndex(fresh_config(redis_server.url, ttl_seconds=1.0, maintenance_interval=0.2))
    cold, hot = keys(6, base=1), keys(6, base=5000)
    ix.add(A, cold, ehs(6, 1))
    ix.add(A, hot, ehs(6, 5000))
    t_end = time.monotonic() + 2.6
    i = 0
    while time.monotonic() < t_end:
        assert ix.lookup(hot, [A])[A].blocks == 6
        ix.add(A, [10**6 + i], [10**7 + i])
        i += 1
        time.sleep(0.1)
    assert ix.lookup(cold, [A]) == {}
    assert ix.lookup(hot, [A])[A].blocks == 6
    assert ix.stats().extra["expired"] >= 6
    ix.close()


# -- roles -----------------------------------------------------------------------------------


def workload_ops(seed: int, n_ops: int) -> tuple[list[tuple[Any, ...]], list[list[int]]]:
    """Random index writes over prompts that share prefixes, and the prompts to score."""
    rng = random.Random(seed)
    systems = [[rng.randrange(50_000) for _ in range(16 * 8)] for _ in range(3)]
    prompts = [
        rng.choice(systems) + [rng.randrange(50_000) for _ in range(16 * rng.randint(1, 12))]
        for _ in range(24)
    ]
    pods = [f"10.1.0.{i}:8000" for i in range(6)]
    ops: list[tuple[Any, ...]] = []
    stored: list[tuple[str, int, int]] = []
    for _ in range(n_ops):
        r = rng.random()
        pod = rng.choice(pods)
        if r < 0.55 or not stored:
            pi = rng.randrange(len(prompts))
            nblocks = len(prompts[pi]) // 16
            start = rng.randrange(nblocks)
            end = rng.randint(start + 1, nblocks)
            tier = rng.choice([None, None, "GPU", "cpu"])
            ops.append(("add", pod, pi, start, end, tier))
            stored.append((pod, pi, end))
        elif r < 0.75:
            spod, pi, end = rng.choice(stored)
            ops.append(("remove", spod, pi, rng.randrange(end), rng.choice([None, "cpu"])))
        elif r < 0.85:
            spod, pi, end = rng.choice(stored)
            ops.append(("add_tier", spod, pi, rng.randrange(end), "cpu"))
        elif r < 0.95:
            ops.append(("spec", pod, rng.randrange(len(prompts))))
        else:
            ops.append(("purge", pod))
    return ops, prompts


def apply_ops(ix: Indexer, ops: list[tuple[Any, ...]], prompts: list[list[int]]) -> None:
    """Apply workload ops through the index API, engine hashes derived from the keys."""
    for op in ops:
        kind, pod = op[0], op[1]
        if kind == "purge":
            ix.purge_pod(pod)
            continue
        if kind == "spec":
            ix.record_speculative(pod, ix.block_keys(prompts[op[2]], "m"), ttl=60)
            continue
        ks = ix.block_keys(prompts[op[2]], "m")
        if kind == "add":
            _, _, _, start, end, tier = op
            ix.index.add(pod, ks[start:end], [k ^ 0x5A5A for k in ks[start:end]], tier)
        elif kind == "remove":
            ix.index.remove(pod, [ks[op[3]] ^ 0x5A5A], op[4])
        else:
            ix.index.add_tier(pod, [ks[op[3]] ^ 0x5A5A], op[4])


def test_scoring_replica_agrees_with_memory(redis_server: RedisProcess) -> None:
    """A scoring-only Indexer reading what another Indexer writes to Redis scores exactly like
    one in-memory Indexer fed the same writes."""
    prefix = f"roles{uuid.uuid4().hex[:8]}:"
    cfg = indexer_config(redis_server.url, prefix)
    writer = Indexer(cfg)
    reader = Indexer(cfg, ingest=False)
    ref = Indexer({k: v for k, v in cfg.items() if k != "kvBlockIndexConfig"})
    ops, prompts = workload_ops(seed=11, n_ops=400)
    apply_ops(writer, ops, prompts)
    apply_ops(ref, ops, prompts)
    pods = [f"10.1.0.{i}:8000" for i in range(6)] + ["10.1.0.99:8000"]
    rng = random.Random(3)
    queries = prompts + [p[: 16 * rng.randint(1, len(p) // 16)] for p in prompts]
    checked = 0
    for q in queries:
        want = ref.match("m", q, pods)
        got = reader.match("m", q, pods)
        assert got.error is None
        for p in pods:
            assert got.pods[p].score == pytest.approx(want.pods[p].score), (p, q[:3])
            assert got.pods[p].blocks == want.pods[p].blocks
            assert dict(got.pods[p].tiers) == dict(want.pods[p].tiers)
            checked += want.pods[p].blocks > 0
        assert reader.score("m", q) == pytest.approx(ref.score("m", q))
    assert checked > 20
    assert reader.stats().entries == ref.stats().entries
    assert sorted(reader.index.pods()) == sorted(ref.index.pods())
    for ix in (writer, reader, ref):
        ix.close()


def test_scoring_replica_in_another_process(redis_server: RedisProcess) -> None:
    """A scoring-only Indexer in a separate process sees the writer's index."""
    prefix = f"proc{uuid.uuid4().hex[:8]}:"
    cfg = indexer_config(redis_server.url, prefix)
    writer = Indexer(cfg)
    ref = Indexer({k: v for k, v in cfg.items() if k != "kvBlockIndexConfig"})
    ops, prompts = workload_ops(seed=5, n_ops=200)
    apply_ops(writer, ops, prompts)
    apply_ops(ref, ops, prompts)
    pods = [f"10.1.0.{i}:8000" for i in range(6)]
    script = (
        "import json, sys\n"
        "from kvaware_scorer import Indexer\n"
        "cfg, prompts, pods = json.load(sys.stdin)\n"
        "ix = Indexer(cfg, ingest=False)\n"
        "print(json.dumps([ix.score('m', p, pods) for p in prompts]))\n"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps([cfg, prompts, pods]),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        check=True,
    )
    got = json.loads(proc.stdout)
    for p, scores in zip(prompts, got, strict=True):
        assert scores == pytest.approx(ref.score("m", p, pods))
    writer.close()


# -- failure behaviour -------------------------------------------------------------------------


def test_restart_mid_run_degrades_then_recovers(own_redis: RedisProcess) -> None:
    """With Redis stopped, scoring returns zeros fast and counts the error, writes are buffered;
    after a restart both recover by themselves and the buffered writes land."""
    cfg = indexer_config(
        own_redis.url,
        "fail:",
        socketTimeout=0.2,
        connectTimeout=0.2,
        retryInterval=0.3,
        maintenanceInterval=0.2,
    )
    ix = Indexer(cfg)
    toks = list(range(16 * 8))
    ks = ix.block_keys(toks, "m")
    ix.index.add(A, ks, [k + 1 for k in ks])
    assert ix.score("m", toks, [A, B]) == {A: 1.0, B: 0.0}

    own_redis.stop()
    t0 = time.monotonic()
    assert ix.score("m", toks, [A, B]) == {A: 0.0, B: 0.0}
    assert time.monotonic() - t0 < 2.0
    t0 = time.monotonic()
    for _ in range(20):
        assert ix.score("m", toks, [A, B]) == {A: 0.0, B: 0.0}
    assert (
        time.monotonic() - t0 < 2.0
    )  # no waiting on a known-down server (20 connect timeouts would take 5 s)
    errors = ix.metrics.registry.get_sample_value(
        "kvaware_score_errors_total", {"reason": "backend"}
    )
    assert errors is not None and errors >= 21
    ix.index.add(B, ks[:4], [k + 2 for k in ks[:4]])
    ix.index.remove(A, [ks[0] + 1])
    assert ix.index.resolve(B, ks[3] + 2) == ks[3]  # answered from the buffer
    st = ix.stats()
    assert st.extra["available"] == 0.0 and st.extra["buffered_now"] == 2

    own_redis.start()  # an empty server: what was indexed before is gone, buffered writes land
    assert wait_for(lambda: ix.index.stats().extra["buffered_now"] == 0, timeout=5)
    assert wait_for(lambda: ix.score("m", toks, [A, B])[B] == 0.5, timeout=5)
    assert ix.stats().extra["replayed_writes"] == 2
    ix.close()


def test_slow_server_times_out_then_recovers(own_redis: RedisProcess) -> None:
    """A hung server makes lookups fail within the socket timeout, not hang; it recovers."""
    ix = RedisIndex(
        fresh_config(own_redis.url, socket_timeout=0.2, connect_timeout=0.2, retry_interval=0.2)
    )
    ix.add(A, keys(4), ehs(4))
    assert own_redis.proc is not None
    own_redis.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(BackendUnavailableError):
            ix.lookup(keys(4), [A])
        assert time.monotonic() - t0 < 2.0
        ix.add(B, keys(2), ehs(2, 9))  # buffered, returns at once
        assert time.monotonic() - t0 < 2.5
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
    assert wait_for(lambda: B in ix.lookup(keys(4), [A, B]) if _up(ix) else False, timeout=5)
    assert ix.lookup(keys(4), [A, B])[A].blocks == 4
    ix.close()


def test_write_applied_after_its_timeout_is_not_applied_again(own_redis: RedisProcess) -> None:
    """Writes that time out but reach a paused server are applied once, not again on replay."""
    ix = RedisIndex(
        fresh_config(own_redis.url, socket_timeout=0.2, connect_timeout=0.2, retry_interval=0.2)
    )
    ix.add(A, keys(4), ehs(4))
    ix.add(A, keys(4), ehs(4))  # two copies of each block
    assert own_redis.proc is not None
    own_redis.proc.send_signal(signal.SIGSTOP)
    try:
        with ix.batch() as b:  # sent, unanswered: buffered, and applied once the server resumes
            b.add(B, keys(2), ehs(2, 9))
            b.remove(A, ehs(4))
            b.purge(C)
        assert b.results == [None, None, None]
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
    assert wait_for(lambda: ix.flush() and _up(ix), timeout=5)
    assert ix.references(B) == {"gpu": {h: 1 for h in ehs(2, 9)}}
    assert ix.references(A) == {"gpu": {h: 1 for h in ehs(4)}}
    assert ix.remove(B, ehs(2, 9)) == 2
    res = ix.lookup(keys(4), [A, B])
    assert B not in res and res[A].blocks == 4
    assert ix.stats().extra["replayed_writes"] == 3
    ix.close()


def _up(ix: RedisIndex) -> bool:
    try:
        ix.lookup([1], [A])
    except BackendUnavailableError:
        return False
    return True


def test_buffer_is_bounded_and_drops_oldest(own_redis: RedisProcess) -> None:
    """Beyond max_buffered_writes the oldest buffered writes are dropped and counted."""
    ix = RedisIndex(
        fresh_config(own_redis.url, max_buffered_writes=3, retry_interval=0.2, socket_timeout=0.2)
    )
    ix.add(C, keys(1, base=7), ehs(1, 7))  # connect (and start the writer thread)
    own_redis.stop()
    for i in range(5):
        ix.add(A, [100 + i], [200 + i])
    st = ix.stats()
    assert st.extra["dropped_writes"] == 2 and st.extra["buffered_now"] == 3
    own_redis.start()
    assert wait_for(lambda: ix.stats().extra.get("available") == 1.0, timeout=5)
    assert wait_for(lambda: ix.stats().entries == 3, timeout=5)
    assert A not in ix.lookup([100], [A]) and ix.lookup([104], [A])[A].blocks == 1
    ix.close()


def test_outage_memory_is_bounded_by_the_buffer(own_redis: RedisProcess) -> None:
    """Through a long outage, what resolve answers from is bounded with the buffer: dropped
    writes are forgotten, buffered ones still resolve."""
    ix = RedisIndex(
        fresh_config(own_redis.url, max_buffered_writes=50, retry_interval=60, socket_timeout=0.2)
    )
    ix.add(C, keys(1, base=7), ehs(1, 7))
    own_redis.stop()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(3000):
            ix.add(A, keys(16, base=10**6 + 16 * i), ehs(16, 10**7 + 16 * i))
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 1_000_000  # 50 writes of 16 blocks, where 48,000 remembered hashes took 5 MB
    last = 10**7 + 16 * 2999
    assert ix.resolve(A, last) == 10**6 + 16 * 2999
    with pytest.raises(BackendUnavailableError):
        ix.resolve(A, 10**7)  # its write was dropped: not known
    ix.close()


# -- cluster ---------------------------------------------------------------------------------


def test_cluster_spreads_blocks_over_every_master(redis_cluster: Any) -> None:
    """On a 3-master cluster the shards sit on distinct masters and all of them hold blocks,
    and lookups over many pods agree with the in-memory index."""
    cfg = fresh_config(redis_cluster.url, cluster=True)
    ix = RedisIndex(cfg)
    mem = InMemoryIndex()
    rng = random.Random(2)
    pods = [f"10.2.0.{i}:8000" for i in range(8)]
    prompts = [[rng.getrandbits(64) for _ in range(64)] for _ in range(10)]
    for i in range(60):
        p, q = rng.choice(pods), rng.choice(prompts)
        n = rng.randint(1, 64)
        hs = [rng.getrandbits(64) for _ in range(n)]
        tier = rng.choice([None, "cpu"])
        ix.add(p, q[:n], hs, tier)
        mem.add(p, q[:n], hs, tier)
        if i % 7 == 0:
            ix.remove(p, hs[n // 2 :])
            mem.remove(p, hs[n // 2 :])
    ix.purge(pods[0])
    mem.purge(pods[0])
    for q in prompts:
        assert_same(ix.lookup(q, pods), mem.lookup(q, pods))
        assert_same(ix.lookup(q), mem.lookup(q))
    st, ref = ix.stats(), mem.stats()
    assert (st.entries, st.blocks, st.pods) == (ref.entries, ref.blocks, ref.pods)
    assert st.extra["shards"] == 3
    sizes = [
        redis.Redis(port=n.port).execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)
        for n, slot in _shard_slots(redis_cluster, cfg.key_prefix)
    ]
    assert all(s > 10 for s in sizes), sizes
    ix.close()


def _shard_slots(cluster: Any, prefix: str) -> list[tuple[Any, int]]:
    """(node, slot) of every shard of the index with this key prefix."""
    client = redis.Redis(port=cluster.nodes[0].port)
    out = []
    layout = redis.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port).get(
        prefix.encode() + b"layout"
    )
    assert layout is not None
    owners = {}
    for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
        owners[(int(start), int(end))] = int(master[1])
    for tag in layout.decode().split()[1:]:
        slot = int(client.execute_command("CLUSTER", "KEYSLOT", tag))
        port = next(p for (a, b), p in owners.items() if a <= slot <= b)
        out.append((next(n for n in cluster.nodes if n.port == port), slot))
    assert len({n.port for n, _ in out}) == 3
    return out


def test_cluster_master_down_then_back(redis_binary: str, tmp_path: Path) -> None:
    """A stopped cluster master makes lookups fail fast (zeros via the Indexer) and writes
    buffer; once it is back the index serves again and the buffered writes land."""
    cluster = RedisClusterProcesses(redis_binary, tmp_path)
    cluster.start()
    try:
        cfg = indexer_config(
            cluster.url,
            "cfail:",
            cluster=True,
            socketTimeout=0.3,
            connectTimeout=0.3,
            retryInterval=0.3,
        )
        ix = Indexer(cfg)
        toks = list(range(16 * 12))
        ks = ix.block_keys(toks, "m")
        ix.index.add(A, ks, [k + 1 for k in ks])
        assert ix.score("m", toks, [A]) == {A: 1.0}
        down = cluster.nodes[1]
        down.stop()
        t0 = time.monotonic()
        assert ix.score("m", toks, [A]) == {A: 0.0}
        assert time.monotonic() - t0 < 1.0
        ix.index.add(B, ks[:6], [k + 2 for k in ks[:6]])
        assert ix.stats().extra["buffered_now"] == 1
        down.start()  # an empty master that keeps its slots (nodes.conf survives)
        assert wait_for(lambda: ix.index.stats().extra.get("buffered_now") == 0, timeout=15)
        assert wait_for(lambda: ix.score("m", toks, [A, B])[B] == 0.5, timeout=10)
        ix.close()
    finally:
        cluster.stop()


def test_write_behind_batches_apply_in_order(redis_server: RedisProcess) -> None:
    """Batches handed to the writer thread are applied in order, report their results to
    their callbacks, and are seen by later resolves, references and direct writes."""
    ix = RedisIndex(fresh_config(redis_server.url))
    done: list[Any] = []
    for i in range(12):
        with ix.batch(on_done=done.append) as b:
            b.add(A, keys(4, base=100 * i), ehs(4, 100 * i))
            b.remove(A, ehs(1, 100 * i) + [5])
    assert ix.resolve(A, ehs(1, 1100)[0] + 3) == 1100 + 3
    assert done == [[None, 1]] * 12
    assert len(ix.references(A)["gpu"]) == 12 * 3
    assert ix.remove(A, ehs(3, 1101)) == 3
    assert ix.lookup(keys(4, base=1100), [A]) == {}
    ix.close()


def test_write_behind_buffers_through_an_outage(own_redis: RedisProcess) -> None:
    """With Redis down, written-behind batches are buffered (results not known) and land
    once it is back."""
    ix = RedisIndex(
        fresh_config(own_redis.url, socket_timeout=0.2, connect_timeout=0.2, retry_interval=0.2)
    )
    ix.add(A, keys(2), ehs(2))
    own_redis.stop()
    done: list[Any] = []
    t0 = time.monotonic()
    with ix.batch(on_done=done.append) as b:
        b.add(B, keys(3, base=50), ehs(3, 50))
        b.remove(A, ehs(1))
    assert wait_for(lambda: bool(done), timeout=5)
    assert done == [[None, None]] and time.monotonic() - t0 < 2
    own_redis.start()  # empty: the buffered writes land in it
    assert wait_for(lambda: ix.stats().extra.get("buffered_now") == 0, timeout=10)
    assert ix.references(B) == {"gpu": dict.fromkeys(ehs(3, 50), 1)}
    ix.close()

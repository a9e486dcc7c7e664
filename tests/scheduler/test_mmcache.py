"""``mm-embeddings-cache-producer`` / ``-scorer``: media items recorded per pod at pre-request,
scored as the fraction of a request's items a pod holds, bounded per pod and forgotten when a
pod leaves, as upstream llm-d's multimodal encoder-cache affinity."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import xxhash
import yaml

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.plugins import mmcache
from kvaware_scorer.plugins.mmcache import (
    MAX_ITEMS,
    MMEmbeddingsCacheProducer,
    MMEmbeddingsCacheScorer,
    capacity_for,
    media_items,
)
from kvaware_scorer.scheduler import Endpoint, Scheduler, SchedulingRequest

from .conftest import build, config, endpoints

SCORER = "mm-embeddings-cache-scorer"
PRODUCER = "mm-embeddings-cache-producer"
CORPUS = Path(__file__).parent / "upstream_corpus" / "mm-embeddings-cache.yaml"


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def chat(rid: str, *parts: dict[str, Any], text: str = "describe") -> SchedulingRequest:
    content = [{"type": "text", "text": text}, *parts]
    return SchedulingRequest(rid, "m", messages=[{"role": "user", "content": content}])


def mm_config(producer_params: dict[str, Any] | None = None, **scorer: Any) -> dict[str, Any]:
    producer: dict[str, Any] = {"type": PRODUCER}
    if producer_params is not None:
        producer["parameters"] = producer_params
    entry: dict[str, Any] = {"type": SCORER}
    if scorer:
        entry["parameters"] = scorer
    return config(
        [producer, entry, {"type": "max-score-picker"}],
        [
            {
                "name": "default",
                "plugins": [{"pluginRef": SCORER}, {"pluginRef": "max-score-picker"}],
            }
        ],
    )


def scores(s: Scheduler, request: SchedulingRequest, eps: list[Endpoint]) -> dict[str, float]:
    return s.schedule(request, eps, dry_run=True).scores[SCORER]


def record(s: Scheduler, request: SchedulingRequest, target: Endpoint) -> None:
    """Schedule `request` on `target` alone (its pre-request hooks record it there)."""
    assert s.schedule(request, [target]).target is target


# -- parameters --------------------------------------------------------------------------------


def test_capacity_is_budget_over_two_mib() -> None:
    assert capacity_for(4) == 2
    assert capacity_for(2048) == 1024
    assert capacity_for(1) == 1
    assert capacity_for(0) == capacity_for(-3) == 2048  # upstream's 4096 MiB default


def test_parameters_defaults_and_resolved_form() -> None:
    s = build(mm_config({"cacheSizeInMBPerServer": 0}))
    producer = s.plugin(PRODUCER)
    assert isinstance(producer, MMEmbeddingsCacheProducer)
    assert producer.capacity == 2048
    assert s.config.plugins[PRODUCER].parameters() == {"cacheSizeInMBPerServer": 4096}
    assert s.config.plugins[SCORER].parameters() == {"producerName": ""}


@pytest.mark.parametrize(
    ("params", "key", "message"),
    [
        ({"cacheSizeInMB": 2048}, "cacheSizeInMB", "unknown key .*cacheSizeInMBPerServer"),
        ({"cacheSizeInMBPerServer": "2048"}, "cacheSizeInMBPerServer", "valid integer"),
        ({"cacheSizeInMBPerServer": 1.5}, "cacheSizeInMBPerServer", "valid integer"),
        ({"cacheSizeInMBPerServer": True}, "cacheSizeInMBPerServer", "valid integer"),
        ({"cacheSizeInMBPerServer": 2**63}, "cacheSizeInMBPerServer", "less than or equal"),
    ],
)
def test_producer_parameter_errors(params: dict[str, Any], key: str, message: str) -> None:
    """Upstream's strict decoder: unknown keys and non-integers are errors (with the path)."""
    with pytest.raises(ConfigError, match=message) as info:
        build(mm_config(params))
    assert info.value.path == f"plugins[0].parameters.{key}"


def test_router_sample_key_is_rejected() -> None:
    """The router's sample config spells the key cacheSizeInMB, which upstream refuses too."""
    data = yaml.safe_load(CORPUS.read_text())
    data["plugins"][1]["parameters"] = {"cacheSizeInMB": 2048}
    with pytest.raises(ConfigError) as info:
        build(data)
    assert "plugins[1].parameters.cacheSizeInMB" in str(info.value)


def test_scorer_parameter_errors() -> None:
    with pytest.raises(ConfigError, match="unknown") as info:
        build(mm_config(weight=2))
    assert "plugins[1].parameters.weight" in str(info.value)
    with pytest.raises(ConfigError, match="names no plugin") as info:
        build(mm_config(producerName="nope"))
    assert "plugins[1].parameters.producerName" in str(info.value)
    data = mm_config(producerName="max-score-picker")
    with pytest.raises(ConfigError, match="no pre-request") as info:
        build(data)
    assert "plugins[1].parameters.producerName" in str(info.value)
    data["plugins"].append({"type": "prefix-cache-scorer"})
    data["schedulingProfiles"][0]["plugins"].append({"pluginRef": "prefix-cache-scorer"})
    data["plugins"][1]["parameters"] = {"producerName": "prefix-cache-scorer"}
    with pytest.raises(ConfigError, match="not a 'mm-embeddings-cache-producer'") as info:
        build(data)
    assert "plugins[1].parameters.producerName" in str(info.value)


# -- media items -------------------------------------------------------------------------------


def test_media_items_of_chat_parts() -> None:
    """Image, video and audio parts are items (hashed as upstream's estimate token producer:
    XXH64 of the URL, or of the audio data and format); repeats count once; text does not."""
    req = SchedulingRequest(
        "r",
        "m",
        messages=[
            {"role": "system", "content": "plain text"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    image("https://example.com/cat.png"),
                    image("data:image/png;base64,iVBORw0KGgo="),
                    {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}},
                    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                    {"type": "audio_url", "audio_url": {"url": "https://example.com/a.wav"}},
                    {"type": "input_image", "image_url": "https://example.com/dog.png"},
                ],
            },
            {"role": "user", "content": [image("https://example.com/cat.png")]},
        ],
    )
    expected = [
        "https://example.com/cat.png",
        "data:image/png;base64,iVBORw0KGgo=",
        "https://example.com/v.mp4",
        "UklGRg==wav",
        "https://example.com/a.wav",
        "https://example.com/dog.png",
    ]
    assert media_items(req) == tuple(xxhash.xxh64_intdigest(t.encode()) for t in expected)
    assert media_items(SchedulingRequest("t", "m", prompt="a photo")) == ()
    assert media_items(SchedulingRequest("t", "m", token_ids=[1, 2, 3])) == ()


@pytest.mark.parametrize(
    "messages",
    [
        None,
        "not a list",
        [None, 3, "x", ["nested"]],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": {"type": "image_url"}}],
        [{"role": "user", "content": [1, None, "text", ["x"], {"type": 7}]}],
        [
            {
                "role": "user",
                "content": [{"type": "image_url"}, {"type": "image_url", "image_url": 5}],
            }
        ],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ["a"]}}]}],
        [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"format": "wav"}}]}],
        [{"role": "user", "content": [{"type": "input_audio", "input_audio": "raw"}]}],
    ],
)
def test_malformed_content_has_no_items_and_scores_neutrally(messages: Any) -> None:
    s = build(mm_config())
    eps = endpoints(3)
    req = SchedulingRequest("r", "m", messages=messages)
    assert media_items(req) == ()
    result = s.schedule(req, eps)
    assert result.errors == {}
    assert set(result.scores[SCORER].values()) == {0.0}
    assert s.plugin(PRODUCER).tracked() == []


def test_lone_surrogates_and_huge_data_urls_are_bounded() -> None:
    """A lone surrogate (a JSON escape) hashes without error; a 64 MiB data URL hashes its head,
    tail and length only, and still tells two such images apart."""
    assert len(media_items(chat("s", image("data:image/png;base64,\ud800")))) == 1
    body = "A" * (64 * 1024 * 1024)
    huge = "data:image/png;base64," + body
    other = "data:image/png;base64," + body[:-1] + "B"
    start = time.perf_counter()
    a = media_items(chat("a", image(huge)))
    b = media_items(chat("b", image(other)))
    elapsed = time.perf_counter() - start
    assert len(a) == len(b) == 1 and a != b
    assert elapsed < 1.0
    longer = media_items(chat("c", image(huge + "A")))
    assert longer != a
    # only the head, the tail and the length are hashed: a change in the middle goes unseen
    middle = len(huge) // 2
    same = huge[:middle] + "B" + huge[middle + 1 :]
    assert media_items(chat("d", image(same))) == a


def test_thousands_of_images_are_capped() -> None:
    s = build(mm_config({"cacheSizeInMBPerServer": 64}))  # 32 items per pod
    eps = endpoints(2)
    req = chat("r", *(image(f"https://img/{i}.png") for i in range(5000)))
    assert len(media_items(req)) == MAX_ITEMS
    start = time.perf_counter()
    record(s, req, eps[0])
    again = chat("r2", *(image(f"https://img/{i}.png") for i in range(5000)))
    sc = scores(s, again, eps)
    assert time.perf_counter() - start < 2.0
    producer = s.plugin(PRODUCER)
    assert producer.cached_items(eps[0].id) == 32
    # the last 32 of the first MAX_ITEMS items stayed; the request counts MAX_ITEMS items
    assert sc == {eps[0].id: 32 / MAX_ITEMS, eps[1].id: 0.0}


def test_many_text_parts_stop_the_scan() -> None:
    parts = [{"type": "text", "text": "x"}] * (mmcache.MAX_PARTS + 10)
    req = chat("r", *parts, image("https://img/late.png"))
    assert media_items(req) == ()


# -- recording and scoring ---------------------------------------------------------------------


def test_scores_are_the_fraction_of_items_recorded_on_each_pod() -> None:
    s = build(mm_config())
    eps = endpoints(3)
    a, b, c, d = (image(f"https://img/{x}.png") for x in "abcd")
    record(s, chat("1", a, b), eps[0])
    record(s, chat("2", c), eps[1])
    sc = scores(s, chat("q", a, c, d, a), eps)  # a counted once: 3 distinct items
    assert sc == pytest.approx({eps[0].id: 1 / 3, eps[1].id: 1 / 3, eps[2].id: 0.0})
    sc = scores(s, chat("q2", a, b), eps)
    assert sc == {eps[0].id: 1.0, eps[1].id: 0.0, eps[2].id: 0.0}
    # a text-only request: neutral (0 everywhere), as upstream
    plain = SchedulingRequest("t", "m", messages=[{"role": "user", "content": "hi"}])
    assert scores(s, plain, eps) == dict.fromkeys((e.id for e in eps), 0.0)


def test_affinity_routes_repeat_media_to_the_same_pod() -> None:
    s = build(mm_config(), seed=1)
    eps = endpoints(4)
    first = s.schedule(chat("1", image("https://img/x.png")), eps).target
    for i in range(5):
        again = s.schedule(chat(f"r{i}", image("https://img/x.png"), text=f"q{i}"), eps)
        assert again.target is first
        assert again.scores[SCORER][first.id] == 1.0


def test_dry_run_and_text_requests_record_nothing() -> None:
    s = build(mm_config())
    eps = endpoints(2)
    s.schedule(chat("1", image("https://img/x.png")), eps, dry_run=True)
    s.schedule(SchedulingRequest("2", "m", prompt="no media"), eps)
    assert s.plugin(PRODUCER).tracked() == []


def test_every_primary_target_is_recorded_not_other_profiles() -> None:
    data = config(
        [
            {"type": PRODUCER},
            {"type": SCORER},
            {"type": "max-score-picker", "parameters": {"maxNumOfEndpoints": 2}},
        ],
        [
            {
                "name": "default",
                "plugins": [{"pluginRef": SCORER}, {"pluginRef": "max-score-picker"}],
            }
        ],
    )
    s = build(data)
    eps = endpoints(3)
    result = s.schedule(chat("1", image("https://img/x.png")), eps)
    assert len(result.targets) == 2
    producer = s.plugin(PRODUCER)
    assert sorted(producer.tracked()) == sorted(e.id for e in result.targets)


def test_lru_evicts_at_the_size_bound_and_lookups_keep_recency() -> None:
    s = build(mm_config({"cacheSizeInMBPerServer": 4}))  # 2 items per pod
    eps = endpoints(2)
    pod = eps[0]
    h1, h2, h3 = (image(f"https://img/{i}.png") for i in (1, 2, 3))
    record(s, chat("1", h1), pod)
    record(s, chat("2", h2), pod)
    # looking h1 up does not make it recent (upstream's Contains)
    assert scores(s, chat("q", h1), eps)[pod.id] == 1.0
    record(s, chat("3", h3), pod)
    assert s.plugin(PRODUCER).cached_items(pod.id) == 2
    assert scores(s, chat("q1", h1), eps)[pod.id] == 0.0
    assert scores(s, chat("q23", h2, h3), eps)[pod.id] == 1.0
    # recording h2 again refreshes it: h3 is now the oldest
    record(s, chat("4", h2), pod)
    record(s, chat("5", h1), pod)
    assert scores(s, chat("q3", h3), eps)[pod.id] == 0.0
    assert scores(s, chat("q12", h1, h2), eps)[pod.id] == 1.0


def test_pods_leaving_the_pool_are_forgotten() -> None:
    s = build(mm_config())
    eps = endpoints(3)
    s.set_endpoints(eps)
    img = image("https://img/x.png")
    record(s, chat("1", img), eps[0])
    record(s, chat("2", img), eps[1])
    producer = s.plugin(PRODUCER)
    s.set_endpoints(eps[1:])
    assert producer.cached_items(eps[0].id) == 0
    assert producer.tracked() == [eps[1].id]
    # the pod coming back starts cold
    s.set_endpoints(eps)
    assert scores(s, chat("q", img), eps) == {eps[0].id: 0.0, eps[1].id: 1.0, eps[2].id: 0.0}


def test_tracked_endpoints_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mmcache, "MAX_TRACKED_ENDPOINTS", 3)
    s = build(mm_config())
    eps = endpoints(5)
    for i, e in enumerate(eps):
        record(s, chat(str(i), image("https://img/x.png")), e)
    assert s.plugin(PRODUCER).tracked() == [e.id for e in eps[2:]]


# -- producer wiring ---------------------------------------------------------------------------


def test_scorer_without_configured_producer_uses_a_default_one() -> None:
    """Upstream auto-creates the default producer; the scorer owns one (recording through its
    pre-request hook and dropping removed pods)."""
    s = build(
        config(
            [{"type": SCORER}, {"type": "max-score-picker"}],
            [{"name": "p", "plugins": [{"pluginRef": SCORER}, {"pluginRef": "max-score-picker"}]}],
        )
    )
    scorer = s.plugin(SCORER)
    assert isinstance(scorer, MMEmbeddingsCacheScorer) and scorer.own is not None
    assert scorer.own.capacity == 2048
    eps = endpoints(2)
    s.set_endpoints(eps)
    img = image("https://img/x.png")
    record(s, chat("1", img), eps[1])
    assert scores(s, chat("q", img), eps) == {eps[0].id: 0.0, eps[1].id: 1.0}
    s.set_endpoints(eps[:1])
    assert scorer.own.tracked() == []


def test_scorer_reads_the_named_producer() -> None:
    data = config(
        [
            {"type": PRODUCER},
            {"type": PRODUCER, "name": "small", "parameters": {"cacheSizeInMBPerServer": 2}},
            {"type": SCORER, "parameters": {"producerName": "small"}},
            {"type": "max-score-picker"},
        ],
        [{"name": "p", "plugins": [{"pluginRef": SCORER}, {"pluginRef": "max-score-picker"}]}],
    )
    s = build(data)
    eps = endpoints(2)
    a, b = image("https://img/a.png"), image("https://img/b.png")
    record(s, chat("1", a, b), eps[0])
    # the default producer remembers both; "small" (1 item per pod) only the last
    assert s.plugin(PRODUCER).cached_items(eps[0].id) == 2
    assert s.plugin("small").cached_items(eps[0].id) == 1
    assert scores(s, chat("q", a, b), eps)[eps[0].id] == 0.5


def test_corpus_config_prefers_the_pod_holding_the_image() -> None:
    from .test_upstream_configs import role_fleet

    s = build(yaml.safe_load(CORPUS.read_text()), seed=3)
    fleet = role_fleet()
    try:
        assert s.plugin(PRODUCER).capacity == 1024
        img = image("data:image/jpeg;base64,/9j/4AAQSkZJRg==")
        first = s.schedule(chat("1", img), fleet)
        assert first.target.labels["llm-d.ai/role"] == "decode"
        for i in range(4):
            again = s.schedule(chat(f"r{i}", img, text=f"q{i}"), fleet)
            assert again.target is first.target
            assert again.scores[SCORER][first.target.id] == 1.0
    finally:
        s.close()

"""The ``kvaware events`` command: decode captured payloads, or watch live KV-event streams.

``kvaware events decode FILE...`` prints each payload as one JSON line (hashes in hex), the
quickest way to see what a pod really sends. ``kvaware events listen`` runs the subscriber into
an in-memory index and prints, per interval, what each pod's stream did (batches, blocks held,
gaps, losses, drops): the check for pod-identity and topic mistakes before wiring a scheduler.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add the ``events`` subcommand and its ``decode`` / ``listen`` actions."""
    p = sub.add_parser("events", help="decode or watch vLLM KV events")
    actions = p.add_subparsers(dest="events_action", metavar="ACTION")
    d = actions.add_parser("decode", help="print msgpack payload files as JSON lines")
    d.add_argument("files", nargs="+", type=Path, help="files holding one msgpack payload each")
    d.add_argument(
        "--engine",
        choices=("vllm", "sglang"),
        default="vllm",
        help="wire format of the payloads (default: vllm)",
    )
    d.add_argument(
        "--block-size",
        type=int,
        default=1,
        help="re-chunk SGLang pages to this many tokens, as the index would (default: 1, as sent)",
    )
    d.set_defaults(func=_decode)
    lis = actions.add_parser("listen", help="subscribe and print per-pod stream statistics")
    lis.add_argument(
        "--bind",
        metavar="ENDPOINT",
        help="bind mode endpoint, e.g. tcp://*:5557 (applies every pod a topic names)",
    )
    lis.add_argument(
        "--connect",
        metavar="POD=ENDPOINT[,REPLAY]",
        action="append",
        default=[],
        help="connect mode: a pod id and its publisher (and replay) endpoint; repeatable",
    )
    lis.add_argument("--topic-filter", default="", help='topic prefix (default: "", all)')
    lis.add_argument(
        "--default-model", default=None, help="model when the topic names none (default: none)"
    )
    lis.add_argument(
        "--engine",
        choices=("vllm", "sglang"),
        default="vllm",
        help="wire format of every stream (default: vllm)",
    )
    lis.add_argument("--interval", type=float, default=5.0, help="seconds between reports")
    lis.add_argument("--duration", type=float, default=0.0, help="stop after this (0 = never)")
    lis.set_defaults(func=_listen)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _hex(value: Any) -> Any:
    """Hashes as 16 hex digits (bytes as hex) for JSON output."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:016x}"
    if isinstance(value, list):
        return [_hex(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    return repr(value)


def _decode(args: argparse.Namespace) -> int:
    from kvaware_scorer.errors import EventDecodeError
    from kvaware_scorer.events.decode import EventDecoder, event_fields
    from kvaware_scorer.events.sglang import SGLangEventDecoder

    dec: Any = EventDecoder() if args.engine == "vllm" else SGLangEventDecoder(args.block_size)
    rc = 0
    for path in args.files:
        try:
            batch = dec.decode(path.read_bytes())
        except (OSError, EventDecodeError) as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            rc = 1
            continue
        events = []
        for ev in batch.events:
            fields = event_fields(ev)
            for k in ("block_hashes", "parent_block_hash"):
                if k in fields:
                    fields[k] = _hex(fields[k])
            events.append({k: v for k, v in fields.items() if v is not None})
        line = {
            "file": str(path),
            "ts": batch.ts,
            "data_parallel_rank": batch.data_parallel_rank,
            "form": "array" if batch.legacy else "map",
            "events": events,
            "rejected": batch.rejected,
        }
        try:
            text = json.dumps(line, default=_json_default)
        except (RecursionError, ValueError) as exc:  # e.g. extra keys nested too deep to print
            print(f"{path}: cannot print: {exc!r}", file=sys.stderr)
            rc = 1
            continue
        print(text)
    return rc


def _listen(args: argparse.Namespace) -> int:
    from kvaware_scorer.config import KVEventsConfig
    from kvaware_scorer.errors import ConfigError
    from kvaware_scorer.events.subscriber import KVEventSubscriber
    from kvaware_scorer.indexer import Indexer

    if not args.bind and not args.connect:
        print("give --bind and/or --connect", file=sys.stderr)
        return 2
    indexer = Indexer()
    config = KVEventsConfig(
        zmq_endpoint=args.bind,
        topic_filter=args.topic_filter,
        default_model=args.default_model,
        stats_interval=0,
        engine_type=args.engine,
        # NOTE: a diagnostic listener knows no pods: every pod a topic names is shown (bounded
        # by maxPods, like any open bind mode)
        accept_unknown_pods=True,
    )
    try:
        sub = KVEventSubscriber(indexer, config)
        for spec in args.connect:
            pod, sep, rest = spec.partition("=")
            if not sep or not pod or not rest:
                raise ConfigError(f"expected POD=ENDPOINT[,REPLAY], got {spec!r}", "--connect")
            endpoint, _, replay = rest.partition(",")
            sub.add_endpoint(pod, endpoint, replay or None)
        sub.start()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"listening (bind {sub.bound_endpoint or '-'}, {len(args.connect)} dialed pods)")
    deadline = time.monotonic() + args.duration if args.duration else None
    try:
        while deadline is None or time.monotonic() < deadline:
            wait = args.interval
            if deadline is not None:
                wait = max(0.0, min(wait, deadline - time.monotonic()))
            time.sleep(wait)
            _report(indexer, sub)
    finally:
        sub.stop()
        indexer.close()
    return 0


def _report(indexer: Any, sub: Any) -> None:
    reg = indexer.metrics.registry

    def value(name: str, labels: dict[str, str] | None = None) -> float:
        v = reg.get_sample_value(name, labels or {})
        return 0.0 if v is None else float(v)

    st = indexer.stats()
    drops: dict[str, float] = {}
    for metric in indexer.metrics.dropped.collect():
        for s in metric.samples:
            if s.name.endswith("_total") and s.value:
                drops[s.labels["reason"]] = s.value
    print(
        f"frames {sub.frames_received} | index {st.entries} entries, {st.pods} pods |"
        f" gaps {value('kvaware_seq_gaps_total'):.0f} lost"
        f" {value('kvaware_lost_batches_total'):.0f} orphaned"
        f" {value('kvaware_orphaned_blocks_total'):.0f} | dropped {drops or 0}"
    )
    ingestor = indexer.ingestor
    for pod in sorted(indexer.index.pods()):
        streams = ingestor.streams(pod)
        parts = [
            f"rank {r}: seq {s.last_seq},"
            f" {sum(len(h) for h in ingestor.references(pod, r).values())} hashes,"
            f" model {s.model or '-'}"
            for r, s in sorted(streams.items())
        ]
        print(f"  {pod}: " + "; ".join(parts))

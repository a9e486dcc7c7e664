"""Live routing benchmark: kvaware and peer routers, each in front of fresh emulated vLLM pods.

For every workload and repeat, each router in turn gets FRESH ``kvaware sim serve`` pods (empty
caches, counters at zero), then a real load generator (inference-perf, run from its own venv)
drives it; the table gives what the client measured (TTFT, ITL, throughput) next to what the
pods measured (prefix-cache hit rate from ``vllm:prompt_tokens_cached_total`` /
``vllm:prompt_tokens_total``, overall and per pod, preemptions, the spread of prompt tokens
over the pods) and the router's CPU seconds per request (``/proc/<pid>/stat`` of the router
and its children); with ``--idle S``, also its CPU per second over S seconds without traffic
before the load starts (``idle ms/s``). For kvaware, its own means over the load of the time
from a request's arrival to its forwarding, of scheduling and of tokenization (``gw ovh ms``,
``sched ms``, ``tok ms``), the pod-metrics scrape rounds per request (``rounds/req``) and,
under the table, its CPU per request by thread group (``kvaware_thread_cpu_seconds_total``:
the event loop, tokenizing, KV-event receiving and applying, scraping, native threads).

Routers (``--routers``, comma separated):

* ``kvaware:<config>``: ``kvaware serve`` with a scheduler YAML (``config/*.yaml`` by default,
  each tokenizing plugin pointed at the pods' tokenizer); ``kvaware:<config>@<python>`` runs
  it with another install's Python (two revisions side by side, labelled by that install's
  environment directory);
* ``sglang-router:<policy>``, ``smg:<policy>``, ``vllm-router:<policy>``: the PyPI routers,
  each installed on first use in its own venv under ``--venv-dir`` (``vllm-router:kv_aware``
  subscribes to the pods' KV events). A peer that cannot be installed or started is skipped
  with the reason.

Workloads (``--workloads``): ``shared-prefix`` (inference-perf ``shared_prefix``: 16 groups x 6
prompts of 2,000-token system prompts, Poisson 2 -> 5 -> 8 req/s, streamed completions: the
working set does not fit one pod), ``multi-turn`` (8 groups x 4 chat sessions whose context
grows each turn, 600-token system prompts, 3 req/s: contexts outgrow the fleet) and ``trace``
(inference-perf ``otel_trace_replay`` of the agentic session traces in
``benchmarks/traces/inference-perf-otel``).

Usage::

    python benchmarks/bench_live.py                                   # all routers, shared-prefix
    python benchmarks/bench_live.py --workloads all --repeats 2 --duration 90
    python benchmarks/bench_live.py --routers kvaware:config/precise.yaml,sglang-router:cache_aware
    python benchmarks/bench_live.py --routers kvaware:config/kvaware.yaml,sglang-router:cache_aware --idle 30
    python benchmarks/bench_live.py --routers kvaware:config/kvaware.yaml --no-stream   # whole-body answers

Everything listens on 127.0.0.1. Default runs are short (60 s of load per router and workload);
on a shared machine absolute times are noisy, so routers run back to back per repeat and the
table shows every repeat.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
OTEL_TRACES = ROOT / "benchmarks" / "traces" / "inference-perf-otel"
MODEL = "kvaware/llama-live"
LOADGEN = "inference-perf"
# Peer routers: PyPI package, executable, launch arguments before the common ones.
PEERS: dict[str, tuple[str, str, list[str]]] = {
    "sglang-router": ("sglang-router", "sglang-router", ["launch"]),
    "smg": ("smg", "smg", ["launch"]),
    "vllm-router": ("vllm-router", "vllm-router", []),
}
DEFAULT_ROUTERS = [
    "kvaware:*",
    "sglang-router:cache_aware",
    "smg:cache_aware",
    "vllm-router:cache_aware",
    "vllm-router:kv_aware",
]
WORKLOADS = ["shared-prefix", "multi-turn", "trace"]


def default_venv_dir() -> Path:
    """Where the peers' venvs live: the user's cache directory, never the repository."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvaware" / "bench-live"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _is_python312(exe: str) -> bool:
    """Whether `exe` runs and is a Python 3.12 (a pyenv shim on PATH may refuse to run when
    3.12 is not among pyenv's selected versions)."""
    try:
        done = subprocess.run(
            [exe, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and done.stdout.strip() == "True"


def find_python312() -> str | None:
    """A Python 3.12 for inference-perf that runs (PATH first, then pyenv's versions)."""
    pattern = os.path.join(os.path.expanduser("~"), ".pyenv", "versions", "3.12*", "bin", "python")
    candidates = [shutil.which("python3.12"), *sorted(glob.glob(pattern), reverse=True)]
    for exe in candidates:
        if exe and _is_python312(exe):
            return exe
    return None


# -- venvs --------------------------------------------------------------------------------------


def ensure_venv(venv_dir: Path, name: str, package: str, exe: str, python: str) -> Path:
    """``<venv_dir>/<name>/bin/<exe>``, creating the venv and installing `package` if needed.

    Raises:
        RuntimeError: The venv or the install failed (the message says why).
    """
    env = venv_dir / name
    binary = env / "bin" / exe
    if binary.exists():
        return binary
    venv_dir.mkdir(parents=True, exist_ok=True)
    print(f"installing {package} into {env} ...", flush=True)
    steps = [[python, "-m", "venv", str(env)], [str(env / "bin" / "pip"), "install", "-q", package]]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"{' '.join(cmd[:3])} failed: {' | '.join(tail)}")
    if not binary.exists():
        raise RuntimeError(f"{package} installed no {exe} executable")
    return binary


# -- processes ----------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and its live descendants (``/proc/<pid>/stat``)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in _descendants(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL; only this process (and its group, which it leads)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def sample_sums(page: bytes, names: Iterable[str]) -> dict[str, float]:
    """Per metric name in `names`: the sum of its samples over every label set of a
    Prometheus text page."""
    wanted = set(names)
    sums: dict[str, float] = {}
    for line in page.decode(errors="replace").splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            sums[name] = sums.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return sums


def wait_http(url: str, proc: subprocess.Popen[Any], timeout: float) -> None:
    """Until `url` answers 200 (bounded by `timeout`; the process must stay alive)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before answering {url}")
        try:
            if http_get(url, 2.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f} s")


class Pods:
    """``kvaware sim serve`` in a child process: fresh pods for one run."""

    def __init__(self, args: argparse.Namespace, workdir: Path, tokenizers: Path) -> None:
        self.endpoints = workdir / "endpoints.yaml"
        self.endpoints.unlink(missing_ok=True)
        self.log = open(workdir / "pods.log", "w")  # noqa: SIM115 - closed in stop()
        cmd = [
            sys.executable,
            "-m",
            "kvaware_scorer.cli",
            "sim",
            "serve",
            "--pods",
            str(args.pods),
            "--speedup",
            str(args.speedup),
            "--num-gpu-blocks",
            str(args.num_gpu_blocks),
            "--model",
            MODEL,
            "--tokenizer",
            str(tokenizers / MODEL),
            "--hash-seed",
            "0",
            "--endpoints-out",
            str(self.endpoints),
            "--stop-on-eof",
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.urls: list[str] = []
        self.entries: list[dict[str, Any]] = []

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pods exited with {self.proc.returncode} (see pods.log)")
            if self.endpoints.exists():
                data = yaml.safe_load(self.endpoints.read_text()) or {}
                entries = data.get("endpoints") if isinstance(data, dict) else data
                if entries:
                    self.entries = list(entries)
                    self.urls = [f"http://{e['address']}:{e['port']}" for e in self.entries]
                    for url in self.urls:
                        wait_http(url + "/health", self.proc, 30)
                    return
            time.sleep(0.3)
        raise RuntimeError("pods not ready in time")

    def counters(self) -> list[dict[str, float]]:
        """Per pod: the vLLM counters the table reads."""
        wanted = {
            "vllm:prompt_tokens_total": "prompt",
            "vllm:prompt_tokens_cached_total": "cached",
            "vllm:num_preemptions_total": "preemptions",
            "vllm:generation_tokens_total": "generated",
        }
        out = []
        for url in self.urls:
            _, body = http_get(url + "/metrics")
            sums = sample_sums(body, wanted)
            out.append({key: sums.get(name, 0.0) for name, key in wanted.items()})
        return out

    def stop(self) -> None:
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)
        self.log.close()


# -- routers ------------------------------------------------------------------------------------


@dataclass
class RouterSpec:
    kind: str  # "kvaware" or a PEERS key
    arg: str  # config path or policy
    python: str | None = None  # kvaware only: the Python whose kvaware_scorer runs it

    @property
    def label(self) -> str:
        if self.kind == "kvaware":
            # NOTE: another install is named by its environment's directory (two revisions
            # measured in one session, against the same pods, alternating).
            where = f" @{Path(self.python).parent.parent.name}" if self.python else ""
            return f"kvaware {Path(self.arg).stem}{where}"
        return f"{self.kind} {self.arg}"


def parse_routers(text: str) -> list[RouterSpec]:
    specs: list[RouterSpec] = []
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        kind, _, arg = item.partition(":")
        if kind == "kvaware":
            arg, _, python = arg.partition("@")
            paths = sorted((ROOT / "config").glob("*.yaml")) if arg in ("", "*") else [Path(arg)]
            specs += [
                RouterSpec("kvaware", str(p), python or None)
                for p in paths
                if not p.name.startswith("endpoints")
            ]
        elif kind in PEERS:
            specs.append(RouterSpec(kind, arg or "cache_aware"))
        else:
            raise SystemExit(
                f"unknown router {item!r} (kvaware:<yaml>[@<python>], {', '.join(PEERS)})"
            )
    return specs


def router_command(
    spec: RouterSpec,
    binary: str | None,
    pods: Pods,
    port: int,
    workdir: Path,
    tokenizers: Path,
    block_size: int,
    kvaware_python: str | None = None,
) -> list[str]:
    """The command line that starts `spec` on `port` in front of `pods`."""
    if spec.kind == "kvaware":
        from kvaware_scorer.demo import scheduler_config

        config = workdir / "scheduler.yaml"
        config.write_text(yaml.safe_dump(scheduler_config(spec.arg, tokenizers)))
        return [
            spec.python or kvaware_python or sys.executable,
            "-m",
            "kvaware_scorer.cli",
            "serve",
            "--config",
            str(config),
            "--endpoints",
            str(pods.endpoints),
            "--port",
            str(port),
        ]
    assert binary is not None
    _, _, pre = PEERS[spec.kind]
    cmd = [binary, *pre, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--worker-urls", *pods.urls, "--policy", spec.arg]
    cmd += ["--prometheus-port", str(free_port()), "--log-level", "warn"]
    if spec.kind == "vllm-router" and spec.arg == "kv_aware":
        for url, entry in zip(pods.urls, pods.entries, strict=True):
            cmd += ["--kv-event-source", f"{url}={entry['kvEvents']}"]
            if entry.get("kvEventsReplay"):
                cmd += ["--kv-event-replay-source", f"{url}={entry['kvEventsReplay']}"]
        cmd += ["--kv-event-block-size", str(block_size), "--kv-event-model", MODEL]
    if spec.kind == "vllm-router":
        cmd[cmd.index("warn")] = "warning"
    return cmd


# -- load generator -----------------------------------------------------------------------------


def loadgen_tokenizer(pod_tokenizer: Path, out: Path) -> Path:
    """A word-level tokenizer for the load generator, over the pods' whole-word tokens.

    inference-perf builds prompts of an exact token count by decoding random ids and counting
    the re-encoded text; with the pods' small byte-level BPE, random ids merge on re-encoding and
    it never converges. Over words that are single tokens of the pods' tokenizer (" word"), a
    prompt of N words costs the pods about N tokens too, so lengths stay what the workload says.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    pod = Tokenizer.from_file(str(pod_tokenizer / "tokenizer.json"))
    words: list[str] = []
    for i in range(pod.get_vocab_size(with_added_tokens=False)):
        text = pod.decode([i])
        if len(text) > 2 and text[0] == " " and text[1:].isascii() and text[1:].isalpha():
            words.append(text[1:])
    vocab = {"[UNK]": 0}
    for w in sorted(set(words)):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens(["[UNK]"])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"})
    )
    return out


def loadgen_config(
    workload: str,
    port: int,
    duration: float,
    tokenizer: Path,
    out: Path,
    seed: int,
    stream: bool = True,
) -> dict[str, Any]:
    """inference-perf's config for `workload` against the router on `port` (`stream`: SSE
    answers, else whole-body answers)."""
    cfg: dict[str, Any] = {
        "api": {"type": "completion", "streaming": stream},
        "server": {
            "type": "vllm",
            "model_name": MODEL,
            "base_url": f"http://127.0.0.1:{port}",
            "ignore_eos": True,
        },
        "tokenizer": {"pretrained_model_name_or_path": str(tokenizer)},
        "report": {"request_lifecycle": {"summary": True, "per_stage": False}},
        "storage": {"local_storage": {"path": str(out)}},
    }
    if workload == "shared-prefix":
        third = max(1, round(duration / 3))
        cfg["data"] = {
            "type": "shared_prefix",
            "shared_prefix": {
                "num_groups": 16,
                "num_prompts_per_group": 6,
                "system_prompt_len": 2000,
                "question_len": 100,
                "output_len": 32,
                "seed": seed,
            },
        }
        cfg["load"] = {
            "type": "poisson",
            "stages": [{"rate": r, "duration": third} for r in (2, 5, 8)],
            "num_workers": 1,
            "base_seed": seed,
        }
    elif workload == "multi-turn":
        cfg["data"] = {
            "type": "shared_prefix",
            "shared_prefix": {
                "num_groups": 8,
                "num_prompts_per_group": 4,
                "system_prompt_len": 600,
                "question_len": 150,
                # NOTE: a session's turns run one after another; with long answers on the
                # slowed pods the sessions cannot keep up with 5 req/s and the run never ends.
                "output_len": 32,
                "enable_multi_turn_chat": True,
                "seed": seed,
            },
        }
        cfg["load"] = {
            "type": "poisson",
            # NOTE: 3 req/s keeps the pods below saturation for most of the run while the
            # sessions' contexts outgrow the fleet's cache; at 5 req/s every router queued
            # for seconds and the runs could not tell routers apart.
            "stages": [{"rate": 3, "duration": max(1, round(duration))}],
            "num_workers": 1,
            "base_seed": seed,
        }
    elif workload == "trace":
        cfg["api"] = {"type": "chat", "streaming": stream}
        cfg["data"] = {
            "type": "otel_trace_replay",
            "otel_trace_replay": {
                "trace_directory": str(OTEL_TRACES),
                "use_static_model": True,
                "static_model_name": MODEL,
                "default_max_tokens": 64,
                # The 9 recorded sessions, duplicated (unique segments re-randomized, shared
                # ones kept) so the run lasts and the shared prefixes compete for the cache.
                "duplicate_sessions_target": 64,
            },
        }
        cfg["load"] = {
            "type": "trace_session_replay",
            "stages": [{"concurrent_sessions": 6, "timeout": max(1.0, duration)}],
            "num_workers": 1,
            "base_seed": seed,
        }
    else:
        raise SystemExit(f"unknown workload {workload!r} ({', '.join(WORKLOADS)})")
    return cfg


def _find_summary(out: Path) -> dict[str, Any] | None:
    for path in sorted(out.rglob("*.json")):
        if "summary" in path.name and "lifecycle" in path.name:
            data: dict[str, Any] = json.loads(path.read_text())
            return data
    return None


def _pick(d: Any, *keys: str) -> float | None:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return float(d) if isinstance(d, (int, float)) else None


def parse_summary(summary: dict[str, Any]) -> dict[str, float | None]:
    """TTFT, ITL, throughput and counts from inference-perf's lifecycle summary."""
    ok = summary.get("successes", {})
    lat = ok.get("latency", {})
    return {
        "requests": _pick(ok, "count"),
        "failures": _pick(summary, "failures", "count"),
        "ttft_mean": _pick(lat, "time_to_first_token", "mean"),
        "ttft_p50": _pick(lat, "time_to_first_token", "median")
        or _pick(lat, "time_to_first_token", "p50"),
        "ttft_p90": _pick(lat, "time_to_first_token", "p90"),
        "lat_mean": _pick(lat, "request_latency", "mean"),
        "lat_p90": _pick(lat, "request_latency", "p90"),
        "itl_mean": _pick(lat, "inter_token_latency", "mean"),
        "out_tok_s": _pick(ok, "throughput", "output_tokens_per_sec"),
        "req_s": _pick(ok, "throughput", "requests_per_sec"),
    }


# -- one run ------------------------------------------------------------------------------------


@dataclass
class Result:
    workload: str
    router: str
    repeat: int
    ok: bool = False
    error: str = ""
    metrics: dict[str, float | None] = field(default_factory=dict)


#: kvaware's own histograms read before and after a run: column key -> metric family (means in ms).
GATEWAY_MEANS = {
    "gw_overhead_ms": "kvaware_gateway_overhead_seconds",
    "sched_ms": "kvaware_schedule_latency_seconds",
    "tok_ms": "kvaware_tokenization_latency_seconds",
}


#: kvaware's count of pod-metrics scrapes (every result), read with `GATEWAY_MEANS`.
SCRAPES = "kvaware_metrics_scrapes_total"
#: kvaware's CPU seconds by thread group (``thread`` label), read with `GATEWAY_MEANS`.
THREAD_CPU = "kvaware_thread_cpu_seconds_total"


def labelled_samples(page: bytes, name: str, label: str) -> dict[str, float]:
    """The samples of one metric by the value of one of its labels."""
    out: dict[str, float] = {}
    key = f'{label}="'.encode()
    for line in page.splitlines():
        if not line.startswith(name.encode() + b"{"):
            continue
        start = line.find(key)
        if start < 0:
            continue
        start += len(key)
        value = line[start : line.index(b'"', start)].decode(errors="replace")
        out[value] = out.get(value, 0.0) + float(line.rsplit(b" ", 1)[1])
    return out


def gateway_sums(port: int) -> dict[str, float]:
    """The ``_sum`` and ``_count`` samples of kvaware's histograms in `GATEWAY_MEANS` and its
    scrape count now (empty when its metrics page cannot be read)."""
    try:
        status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    except OSError:
        return {}
    if status != 200:
        return {}
    names = [f + suffix for f in GATEWAY_MEANS.values() for suffix in ("_sum", "_count")]
    sums = sample_sums(body, [*names, SCRAPES])
    for group, cpu in labelled_samples(body, THREAD_CPU, "thread").items():
        sums[f"thread:{group}"] = cpu
    return sums


def gateway_means(after: dict[str, float], before: dict[str, float]) -> dict[str, float | None]:
    """Means (ms) of kvaware's arrival-to-forwarded, scheduling and tokenization histograms
    between two `gateway_sums` readings: over the load alone (the tokenizers' loading and
    warm-up before the gateway listens are not in them; the Rust peers have no equivalent)."""
    out: dict[str, float | None] = dict.fromkeys(GATEWAY_MEANS)
    for key, family in GATEWAY_MEANS.items():
        n = after.get(family + "_count", 0.0) - before.get(family + "_count", 0.0)
        if n > 0:
            total = after.get(family + "_sum", 0.0) - before.get(family + "_sum", 0.0)
            out[key] = 1000 * total / n
    return out


def run_one(
    args: argparse.Namespace,
    spec: RouterSpec,
    binary: str | None,
    loadgen: Path,
    workload: str,
    repeat: int,
    tokenizers: Path,
    workdir: Path,
) -> Result:
    res = Result(workload, spec.label, repeat)
    run_dir = workdir / f"{workload}-{repeat}-{spec.label.replace(' ', '-')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    pods = Pods(args, run_dir, tokenizers)
    router: subprocess.Popen[Any] | None = None
    log = open(run_dir / "router.log", "w")  # noqa: SIM115 - closed below
    try:
        pods.wait_ready()
        port = free_port()
        cmd = router_command(
            spec, binary, pods, port, run_dir, tokenizers, args.block_size, args.kvaware_python
        )
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        router = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=run_dir
        )
        wait_http(f"http://127.0.0.1:{port}/health", router, 60)
        if args.idle > 0:
            # The router with no traffic: what it costs between bursts (scrapes, pollers).
            idle0 = cpu_seconds(router.pid)
            time.sleep(args.idle)
            res.metrics["idle_ms_s"] = 1000 * (cpu_seconds(router.pid) - idle0) / args.idle
        before = pods.counters()
        hist0 = gateway_sums(port) if spec.kind == "kvaware" else {}
        cpu0 = cpu_seconds(router.pid)
        out = run_dir / "loadgen"
        cfg = loadgen_config(
            workload,
            port,
            args.duration,
            args.loadgen_tokenizer,
            out,
            args.seed,
            stream=not args.no_stream,
        )
        cfg_path = run_dir / "loadgen.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        t0 = time.monotonic()
        with open(run_dir / "loadgen.log", "w") as lg:
            gen = subprocess.Popen(
                [str(loadgen), "-c", str(cfg_path), "--log-level", "WARNING"],
                stdout=lg,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=run_dir,
            )
            try:
                gen.wait(timeout=args.duration * 3 + 120)
            except subprocess.TimeoutExpired:
                stop_process(gen)
                raise RuntimeError("the load generator overran its time budget") from None
            except BaseException:
                stop_process(gen)
                raise
        wall = time.monotonic() - t0
        cpu = cpu_seconds(router.pid) - cpu0
        after = pods.counters()
        if router.poll() is not None:
            raise RuntimeError(f"router exited with {router.returncode} during the run")
        summary = _find_summary(out)
        if summary is None:
            tail = (run_dir / "loadgen.log").read_text().strip().splitlines()[-3:]
            raise RuntimeError(f"no inference-perf summary ({' | '.join(tail)})")
        m = parse_summary(summary)
        m.update(res.metrics)
        deltas = [{k: a[k] - b[k] for k in a} for a, b in zip(after, before, strict=True)]
        prompt = sum(d["prompt"] for d in deltas)
        cached = sum(d["cached"] for d in deltas)
        shares = [d["prompt"] for d in deltas]
        mean_share = prompt / len(shares) if shares else 0.0
        m["hit"] = cached / prompt if prompt else None
        m["preempt"] = sum(d["preemptions"] for d in deltas)
        m["spread"] = max(shares) / mean_share if mean_share else None
        # Per pod: a router that packs sessions unevenly lets the lightly loaded pods keep
        # their histories (their hit rate rises) while the busy ones thrash.
        pod_hits = [d["cached"] / d["prompt"] for d in deltas if d["prompt"]]
        m["pods"] = [
            {"prompt": d["prompt"], "cached": d["cached"], "generated": d["generated"]}
            for d in deltas
        ]
        m["hit_min"] = min(pod_hits) if pod_hits else None
        m["hit_max"] = max(pod_hits) if pod_hits else None
        m["cpu_s"] = cpu
        reqs = m.get("requests") or 0
        m["cpu_ms_req"] = 1000 * cpu / reqs if reqs else None
        m["wall_s"] = wall
        if spec.kind == "kvaware":
            hist1 = gateway_sums(port)
            m.update(gateway_means(hist1, hist0))
            # NOTE: scrape rounds (every pod scraped once) per request, over the load alone.
            scrapes = hist1.get(SCRAPES, 0.0) - hist0.get(SCRAPES, 0.0)
            m["rounds_req"] = scrapes / len(deltas) / reqs if reqs and deltas else None
            # NOTE: where the CPU goes, by thread group (main: the event loop), over the load.
            m["thread_ms_req"] = {
                key.split(":", 1)[1]: 1000 * (v - hist0.get(key, 0.0)) / reqs
                for key, v in hist1.items()
                if key.startswith("thread:") and reqs
            }
        log.flush()
        text = (run_dir / "router.log").read_text(errors="replace")
        m["router_errors"] = sum(
            1 for line in text.splitlines() if "Traceback" in line or " ERROR " in line
        )
        res.metrics = m
        res.ok = True
    except Exception as exc:  # one failed run is reported, the others go on
        res.error = str(exc)
    finally:
        if router is not None:
            stop_process(router)
        log.close()
        pods.stop()
    return res


# -- table --------------------------------------------------------------------------------------

COLUMNS = [
    ("TTFT mean", "ttft_mean", "{:.3f}"),
    ("p50", "ttft_p50", "{:.3f}"),
    ("p90", "ttft_p90", "{:.3f}"),
    ("ITL ms", "itl_mean", "{:.1f}"),
    ("lat mean", "lat_mean", "{:.3f}"),
    ("lat p90", "lat_p90", "{:.3f}"),
    ("out tok/s", "out_tok_s", "{:.0f}"),
    ("req", "requests", "{:.0f}"),
    ("fail", "failures", "{:.0f}"),
    ("pod hit", "hit", "{:.3f}"),
    ("hit min", "hit_min", "{:.3f}"),
    ("hit max", "hit_max", "{:.3f}"),
    ("spread", "spread", "{:.2f}"),
    ("preempt", "preempt", "{:.0f}"),
    ("CPU s", "cpu_s", "{:.1f}"),
    ("CPU ms/req", "cpu_ms_req", "{:.1f}"),
    ("idle ms/s", "idle_ms_s", "{:.1f}"),
    ("gw ovh ms", "gw_overhead_ms", "{:.2f}"),
    ("sched ms", "sched_ms", "{:.2f}"),
    ("tok ms", "tok_ms", "{:.2f}"),
    ("rounds/req", "rounds_req", "{:.2f}"),
    ("rtr errs", "router_errors", "{:.0f}"),
]


def format_table(results: list[Result]) -> str:
    head = f"{'workload':<14} {'router':<26} {'rep':>3} " + " ".join(f"{c[0]:>10}" for c in COLUMNS)
    lines = [head]
    for r in results:
        row = f"{r.workload:<14} {r.router:<26} {r.repeat:>3} "
        if not r.ok:
            lines.append(row + f"FAILED: {r.error}")
            continue
        cells = []
        for _, key, fmt in COLUMNS:
            v = r.metrics.get(key)
            if v is not None and key == "itl_mean":
                v *= 1000
            cells.append(f"{fmt.format(v) if v is not None else '-':>10}")
        lines.append(row + " ".join(cells))
    threads = [r for r in results if r.ok and r.metrics.get("thread_ms_req")]
    if threads:
        lines.append("")
        lines.append("kvaware CPU by thread (ms per request; main: the event loop)")
        for r in threads:
            parts = sorted(r.metrics["thread_ms_req"].items(), key=lambda kv: -kv[1])
            text = ", ".join(f"{k} {v:.1f}" for k, v in parts if v >= 0.05)
            lines.append(f"{r.workload:<14} {r.router:<26} {r.repeat:>3} {text}")
    return "\n".join(lines)


def format_summary(results: list[Result]) -> str:
    """Per workload and router over the repeats: the mean and the [min, max] range (the
    run-to-run noise) of the figures the comparison rests on."""
    keys = [
        ("TTFT mean", "ttft_mean", 3),
        ("TTFT p90", "ttft_p90", 3),
        ("latency", "lat_mean", 3),
        ("pod hit", "hit", 3),
    ]
    head = f"{'workload':<14} {'router':<26} {'runs':>4} " + " ".join(
        f"{k[0] + ' [min, max]':>26}" for k in keys
    )
    lines = [head + f" {'CPU ms/req':>10}"]
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.workload, r.router), []).append(r)
    for (workload, router), runs in groups.items():
        ok = [r for r in runs if r.ok]
        row = f"{workload:<14} {router:<26} {len(ok):>4} "
        cells = []
        for _, key, digits in keys:
            vals = [v for r in ok if (v := r.metrics.get(key)) is not None]
            if not vals:
                cells.append(f"{'-':>26}")
                continue
            mean = sum(vals) / len(vals)
            text = f"{mean:.{digits}f} [{min(vals):.{digits}f}, {max(vals):.{digits}f}]"
            cells.append(f"{text:>26}")
        cpu = [v for r in ok if (v := r.metrics.get("cpu_ms_req")) is not None]
        cpu_text = f"{sum(cpu) / len(cpu):.1f}" if cpu else "-"
        lines.append(row + " ".join(cells) + f" {cpu_text:>10}")
    return "\n".join(lines)


def load_results(path: Path) -> list[Result]:
    return [Result(**row) for row in json.loads(path.read_text())]


# -- main ---------------------------------------------------------------------------------------


def _interrupt(signum: int, frame: Any) -> None:
    # SIGTERM unwinds like Ctrl-C, so every run's finally stops its pods, router and load
    # generator instead of orphaning them.
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--routers", default=",".join(DEFAULT_ROUTERS), help="comma-separated router specs")
    add("--workloads", default="shared-prefix", help=f"comma-separated, or all ({WORKLOADS})")
    add("--repeats", type=int, default=2, help="runs of each router per workload (default 2)")
    add("--duration", type=float, default=60.0, help="seconds of load per run (default 60)")
    add("--pods", type=int, default=4, help="emulated pods per run (default 4)")
    add("--speedup", type=float, default=0.1, help="pods' speed-up (default 0.1: 10x slower)")
    add("--num-gpu-blocks", type=int, default=800, help="KV blocks per pod (default 800)")
    add("--block-size", type=int, default=16, help="the pods' block size (default 16)")
    add("--seed", type=int, default=0, help="load generator seed (default 0)")
    add(
        "--no-stream",
        action="store_true",
        help="whole-body answers instead of SSE streams (the client then sees no first token: "
        "compare the 'latency' columns, the request latency)",
    )
    add(
        "--idle",
        type=float,
        default=0.0,
        help="seconds the router runs without traffic before each run, its CPU over them "
        "reported as 'idle ms/s' (default 0: skipped)",
    )
    add("--venv-dir", type=Path, default=default_venv_dir(), help="peer venvs (user cache)")
    add("--python", default=sys.executable, help="Python for the peers' venvs (default: this)")
    add("--loadgen-python", default=None, help="Python 3.12 for inference-perf (default: found)")
    add(
        "--kvaware-python",
        default=None,
        help="Python whose kvaware_scorer runs `kvaware serve` (default: this one; another "
        "install measures another revision against the same pods)",
    )
    add("--workdir", type=Path, default=None, help="keep run logs here (default: a temp dir)")
    add("--json", type=Path, default=None, help="write the results as JSON")
    add("--report", type=Path, default=None, help="print the tables of a --json file and exit")
    args = parser.parse_args()
    if args.report is not None:
        done = sorted(load_results(args.report), key=lambda r: (r.workload, r.router, r.repeat))
        print(format_table(done))
        print()
        print(format_summary(done))
        return

    workloads = WORKLOADS if args.workloads == "all" else args.workloads.split(",")
    specs = parse_routers(args.routers)
    py312 = args.loadgen_python or find_python312()
    if py312 is None:
        raise SystemExit("inference-perf needs Python 3.12 (--loadgen-python)")
    try:
        loadgen = ensure_venv(args.venv_dir, LOADGEN, LOADGEN, LOADGEN, py312)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        raise SystemExit(f"cannot install inference-perf: {exc}") from None
    binaries: dict[str, str | None] = {}
    usable: list[RouterSpec] = []
    for spec in specs:
        if spec.kind == "kvaware":
            usable.append(spec)
            continue
        if spec.kind not in binaries:
            package, exe, _ = PEERS[spec.kind]
            try:
                binaries[spec.kind] = str(
                    ensure_venv(args.venv_dir, spec.kind, package, exe, args.python)
                )
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                print(f"skipping {spec.kind}: cannot install it ({exc})", flush=True)
                binaries[spec.kind] = None
        if binaries[spec.kind] is not None:
            usable.append(spec)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kvaware-live-"))
    workdir.mkdir(parents=True, exist_ok=True)
    from kvaware_scorer.tokenization import install_local_tokenizer

    tokenizers = workdir / "models"
    install_local_tokenizer(tokenizers, MODEL)
    args.loadgen_tokenizer = loadgen_tokenizer(tokenizers / MODEL, workdir / "loadgen-tokenizer")
    print(
        f"{args.pods} pods x {args.num_gpu_blocks} blocks, speedup {args.speedup}; "
        f"{len(usable)} routers x {len(workloads)} workloads x {args.repeats} repeats, "
        f"{args.duration:.0f} s each; logs in {workdir}",
        flush=True,
    )
    results: list[Result] = []
    for workload in workloads:
        for repeat in range(args.repeats):
            # Alternate the order per repeat so drift on a shared machine hits everyone.
            order = usable if repeat % 2 == 0 else list(reversed(usable))
            for spec in order:
                res = run_one(
                    args,
                    spec,
                    binaries.get(spec.kind),
                    loadgen,
                    workload,
                    repeat,
                    tokenizers,
                    workdir,
                )
                results.append(res)
                print(format_table([res]).splitlines()[1], flush=True)
                if args.json is not None:  # after every run: an interrupted sweep keeps its part
                    args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    results.sort(key=lambda r: (workloads.index(r.workload), r.router, r.repeat))
    print()
    print(format_table(results))
    print()
    print(format_summary(results))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))


if __name__ == "__main__":
    main()

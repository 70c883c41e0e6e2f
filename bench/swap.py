"""Hot swap under load: two replica processes follow model-updates.v1 while clients keep sending.

For each engine (`--engines transformers,vllm`; by default both when the vLLM venv
`.rlfeed/venv-vllm` exists, else transformers only, and the JSON says why vLLM is missing),
one after the other, the bench starts:

- a real broker (the embedded one in a temp dir, shared by the engines, or RLFEED_KAFKA_URL's),
  a fresh topic prefix and a checkpoint store in a temp dir holding version 0;
- two replicas as child processes on loopback, `python -m services.cli serve` configured by
  `RLFEED_*` variables, exactly as an operator runs them (the transformers engine with this
  Python, the vLLM engine with `.rlfeed/venv-vllm/bin/python`; vLLM on CPU in float32, eager,
  a 1 GiB KV cache and each replica's OpenMP threads bound to its own core);
- client threads sending `/v1/completions` without pause (each pinned to one replica).

It then publishes K versions one after another: each a lossless delta written with
`CheckpointStore.publish`, then a ModelUpdateEvent produced on the topic; it waits until both
replicas' `/health` show the version before the next. The replica-side figures come from
what an operator sees: each replica's structured log (JSON lines on stderr, kept in a file):
`weights_swapped` carries version, `seconds` (update taken -> served) and `pause_ms` (how long
the engine's generation lock was held to copy the weights in; no batch runs meanwhile), and
the line's `ts` is when the version became the one served; `/health` polls (every 20 ms) and
`/metrics` at the end. Per engine, the JSON has:

- `swap_pause_ms`: p50/p99/max over every swap of both replicas;
- `batches_held_ms`: how long new batches were held off while a version materialized
  (CPU engines, `--load-hold-max-s`); `requests.latency_s` and
  `requests.latency_overlapping_a_swap_s` show what the hold costs the clients;
- `weight_load_ms`: update taken -> version served (materialise + check + wait for the running
  batch + copy), p50/p99/max; `materialize_ms` its first part (fetch, delta decode, checksums);
- `publish_to_serving_s`: produce time -> the `weights_swapped` line's ts, overall and per
  replica; `publish_to_visible_s`: produce time -> the first `/health` poll that shows it;
- `requests`: total, failed (target 0), how many overlapped a swap window of the replica that
  answered them (`ts - seconds` .. `ts`), and the versions that answered;
- `tokens_per_s`: completion tokens of all successful requests over the measured wall time
  (both replicas together, on this machine's cores, while swapping);
- `replica_metrics`: swaps, failed swaps and completion tokens per replica from `/metrics`.

Children die with the bench (also on kill -9: PR_SET_PDEATHSIG), are stopped with SIGTERM
then SIGKILL on exit, Ctrl-C or an error, and the temp dir is removed.

`--model tiny` serves, on both engines, the tiny model widened to head_dim 64 (vLLM's CPU
attention needs head sizes >= 32; `build_vllm_tiny`), so the engines' tokens/s compare the
same model; `--model full` serves SmolLM2-135M-Instruct.

    .venv/bin/python bench/swap.py                                  # tiny model, both engines, 10 versions
    .venv/bin/python bench/swap.py --engines transformers
    .venv/bin/python bench/swap.py --model full --versions 5 --engines vllm
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.logs import records as log_records  # noqa: E402 - after the sys.path fix

FULL_DIR = REPO / ".rlfeed/models/smollm2-135m-instruct"
TINY_DIR = REPO / ".rlfeed/test-cache/tiny-model"
TINY_VLLM_DIR = REPO / ".rlfeed/test-cache/tiny-model-vllm"
VLLM_PYTHON = REPO / ".rlfeed/venv-vllm/bin/python"
ENGINES = ("transformers", "vllm")
MODEL = "bench-swap"


# --- pure helpers -----------------------------------------------------------------------
def percentiles(xs: Iterable[float], scale: float = 1.0, digits: int = 3) -> dict[str, float | int | None]:
    """Nearest-rank p50/p99 and max of `xs` (times `scale`)."""
    s = sorted(xs)
    if not s:
        return {"n": 0, "p50": None, "p99": None, "max": None}

    def rank(q: float) -> float:
        return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]

    return {
        "n": len(s),
        "p50": round(rank(0.50) * scale, digits),
        "p99": round(rank(0.99) * scale, digits),
        "max": round(s[-1] * scale, digits),
    }


@dataclass(frozen=True)
class Swap:
    """One `weights_swapped` log line of a replica."""

    version: int
    served_at: float
    """The line's `ts`: when the version became the one served (wall clock)."""
    seconds: float
    """Update taken -> served."""
    pause_ms: float
    """Generation lock held to copy the weights in."""
    materialize_s: float | None = None
    """Update taken -> weights reconstructed and verified (fetch, delta decode, checksums)."""
    held_ms: float | None = None
    """New batches held off while the version was materialized (CPU engines, `load_hold_max_s`)."""


def swaps_in(records: Iterable[dict[str, Any]]) -> list[Swap]:
    """The swaps a replica logged, in order."""
    return [
        Swap(
            int(r["version"]),
            float(r["ts"]),
            float(r["seconds"]),
            float(r["pause_ms"]),
            None if r.get("materialize_s") is None else float(r["materialize_s"]),
            None if r.get("batches_held_ms") is None else float(r["batches_held_ms"]),
        )
        for r in records
        if r.get("event") == "weights_swapped"
    ]


@dataclass
class Outcome:
    """One client request: replica, wall-clock interval, success, tokens, the version that served it."""

    replica: int
    started: float
    ended: float
    ok: bool
    tokens: int = 0
    version: int | None = None
    error: str | None = None


def overlapping(outcomes: Iterable[Outcome], windows: dict[int, list[tuple[float, float]]]) -> list[Outcome]:
    """Requests whose interval overlaps a swap window of the replica that answered them."""
    return [o for o in outcomes if any(o.started <= b and o.ended >= a for a, b in windows.get(o.replica, []))]


def summarise(
    replica_ids: list[str],
    swaps: list[list[Swap]],
    produced: dict[int, float],
    visible: dict[tuple[int, int], float],
    outcomes: list[Outcome],
    seconds: float,
) -> dict[str, Any]:
    """The per-engine figures from the replicas' logged swaps, the produce times, the /health
    sightings and the client outcomes (pure)."""
    mine = [[s for s in per if s.version in produced] for per in swaps]
    flat = [s for per in mine for s in per]
    by_replica = {
        rid: [s.served_at - produced[s.version] for s in per] for rid, per in zip(replica_ids, mine, strict=True)
    }
    all_lat = [x for xs in by_replica.values() for x in xs]
    windows = {i: [(s.served_at - s.seconds, s.served_at) for s in per] for i, per in enumerate(mine)}
    during = overlapping(outcomes, windows)
    failed = [o for o in outcomes if not o.ok]
    tokens = sum(o.tokens for o in outcomes if o.ok)
    p99 = percentiles(all_lat)["p99"]
    return {
        "swaps_logged": {rid: len(per) for rid, per in zip(replica_ids, mine, strict=True)},
        "swap_pause_ms": percentiles((s.pause_ms for s in flat), 1.0),
        "weight_load_ms": percentiles((s.seconds for s in flat), 1000.0, 1),
        "materialize_ms": percentiles((s.materialize_s for s in flat if s.materialize_s is not None), 1000.0, 1),
        "batches_held_ms": percentiles((s.held_ms for s in flat if s.held_ms is not None), 1.0, 1),
        "weight_load_ms_by_version": {
            rid: {str(s.version): round(s.seconds * 1000.0, 1) for s in per}
            for rid, per in zip(replica_ids, mine, strict=True)
        },
        "publish_to_serving_s": {
            **percentiles(all_lat),
            "by_replica": {
                rid: {**percentiles(xs), "values": [round(x, 3) for x in xs]} for rid, xs in by_replica.items()
            },
        },
        "publish_to_visible_s": percentiles(t - produced[v] for (v, _), t in visible.items()),
        "requests": {
            "total": len(outcomes),
            "failed": len(failed),
            "overlapping_a_swap": len(during),
            "failed_overlapping_a_swap": sum(1 for o in during if not o.ok),
            "latency_s": percentiles(o.ended - o.started for o in outcomes if o.ok),
            "latency_overlapping_a_swap_s": percentiles(o.ended - o.started for o in during if o.ok),
            "versions_served": sorted({o.version for o in outcomes if o.ok and o.version is not None}),
            "first_errors": [o.error for o in failed[:3]],
        },
        "completion_tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None,
        "targets": {
            "publish_to_serving_p99_lt_5s": p99 is not None and p99 < 5.0,
            "zero_failed_requests": not failed and bool(outcomes),
            "every_version_swapped_by_every_replica": all({s.version for s in per} >= set(produced) for per in mine),
        },
    }


def prometheus_totals(text: str, names: Iterable[str]) -> dict[str, float]:
    """The value of each metric in `names` from a /metrics page (samples summed over labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = set(names)
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name in wanted:
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def perturb(weights: dict[str, Any], seed: int, lr: float) -> dict[str, Any]:
    """A next training step shaped like AdamW's: every float element moved by `lr` in a
    seeded random direction (Adam's update is lr * m / sqrt(v), about lr * sign(gradient)
    in its first steps), so the deltas compress like real ones (bench/delta.py measures
    those: fp32 about 4x at one step) rather than like noise."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in weights.items():
        if t.is_floating_point():
            direction = torch.randint(0, 2, t.shape, generator=g).to(t.dtype) * 2 - 1
            out[k] = t + direction * lr
        else:
            out[k] = t.clone()
    return out


def engines_to_run(arg: str | None, vllm_python: Path) -> tuple[list[str], dict[str, str]]:
    """The engines to run and, for each requested one that cannot run, why (pure but for a stat)."""
    requested = list(ENGINES) if arg is None else [e.strip() for e in arg.split(",") if e.strip()]
    unknown = [e for e in requested if e not in ENGINES]
    if unknown or not requested:
        raise ValueError(f"--engines: unknown engine(s) {unknown or requested} (choose from {', '.join(ENGINES)})")
    missing: dict[str, str] = {}
    if "vllm" in requested and not vllm_python.exists():
        missing["vllm"] = f"{vllm_python} not found: build the vLLM venv with `bash ops/bootstrap.sh vllm`"
    return [e for e in requested if e not in missing], missing


# --- I/O shells -------------------------------------------------------------------------
def model_dir(choice: str) -> tuple[Path, str]:
    """The model directory to serve and a label for it (built if needed)."""
    from services.localmodel.build import build, build_vllm_tiny

    if choice == "full":
        return build(FULL_DIR, "full"), "smollm2-135m-instruct"
    if choice == "tiny":
        return build_vllm_tiny(TINY_VLLM_DIR, build(TINY_DIR, "tiny")), "tiny-random-head_dim64"
    return Path(choice), Path(choice).name


@dataclass
class ReplicaProcess:
    """One `rlfeed serve` child, its output in a log file."""

    replica_id: str
    python: Path
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = field(default=None, repr=False)
    started_at: float = 0.0

    def start(self) -> ReplicaProcess:
        from services.child_process import die_with_parent

        self.started_at = time.time()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.python), "-m", "services.cli", "serve"],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
                start_new_session=True,  # Ctrl-C reaches the bench only; it stops the children in order
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def records(self) -> list[dict[str, Any]]:
        try:
            return log_records(self.log_path.read_bytes())
        except FileNotFoundError:
            return []

    def tail(self, n_bytes: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n_bytes:].decode(errors="replace")
        except FileNotFoundError:
            return ""

    def first(self, event: str) -> dict[str, Any] | None:
        return next((r for r in self.records() if r.get("event") == event), None)

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM (uvicorn finishes in-flight requests), then SIGKILL to its process group."""
        if self.proc is None:
            return
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the child and what it started
            self.proc.wait()


def wait_until(cond: Any, timeout_s: float, what: str, poll_s: float = 0.02) -> None:
    """Poll `cond` until true; raise after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


def wait_ready(rep: ReplicaProcess, timeout_s: float) -> str:
    """Wait until `rep` listens, answers /health and has caught up with model-updates.v1; its base URL."""
    import httpx

    deadline = time.monotonic() + timeout_s
    url = None
    while time.monotonic() < deadline:
        if not rep.alive():
            raise RuntimeError(f"replica {rep.replica_id} exited early (rc {rep.proc.returncode}):\n{rep.tail()}")
        if url is None and (rec := rep.first("serving_listen")) is not None:
            url = f"http://127.0.0.1:{rec['port']}"
        if url is not None and rep.first("model_updates_caught_up") is not None:
            try:
                if httpx.get(f"{url}/health", timeout=5).json().get("status") == "ok":
                    return url
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    raise TimeoutError(f"replica {rep.replica_id} not ready after {timeout_s} s:\n{rep.tail()}")


class Clients:
    """Threads sending completions back to back until stopped; each pinned to one replica."""

    def __init__(self, base_urls: list[str], n: int, max_tokens: int) -> None:
        self.base_urls = base_urls
        self.max_tokens = max_tokens
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self, timeout_s: float = 120.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout_s)

    def _run(self, i: int) -> None:
        import httpx

        replica = i % len(self.base_urls)
        url = f"{self.base_urls[replica]}/v1/completions"
        with httpx.Client(timeout=300) as http:
            k = 0
            while not self._stop.is_set():
                k += 1
                t0 = time.time()
                try:
                    r = http.post(
                        url,
                        json={
                            "model": MODEL,
                            "prompt": f"Client {i} request {k}: tell me about robots.",
                            "max_tokens": self.max_tokens,
                            "temperature": 1.0,
                            "seed": i * 100_000 + k,
                        },
                    )
                    body = r.json()
                    ok = r.status_code == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")
                    out = Outcome(
                        replica,
                        t0,
                        time.time(),
                        ok,
                        body.get("usage", {}).get("completion_tokens", 0) if ok else 0,
                        body.get("policy_version"),
                        None if ok else f"{r.status_code}: {r.text[:200]}",
                    )
                except Exception as exc:
                    out = Outcome(replica, t0, time.time(), False, error=f"{type(exc).__name__}: {exc}")
                with self._lock:
                    self.outcomes.append(out)


def produce(bootstrap: str, prefix: str, ev: Any) -> float:
    """Produce `ev` on model-updates.v1 and wait for the ack; returns the produce (wall) time."""
    from confluent_kafka import Producer

    from schemas.codec import encode, key_of
    from schemas.topics import MODEL_UPDATES
    from services.kafka.producers import producer_config

    p = Producer({**producer_config(bootstrap)})
    t = time.time()
    p.produce(MODEL_UPDATES.full_name(prefix), value=encode(ev), key=key_of(ev, MODEL_UPDATES.key))
    if p.flush(30) != 0:
        raise RuntimeError("model update not acknowledged by the broker within 30 s")
    return t


def replica_env(
    engine: str,
    name: str,
    index: int,
    bootstrap: str,
    prefix: str,
    path: Path,
    store_root: Any,
    home: Path,
    args: argparse.Namespace,
) -> dict[str, str]:
    """The child's environment: ours, offline for model hubs, plus its `RLFEED_*` settings."""
    settings: dict[str, object] = {
        "kafka_url": f"kafka://{bootstrap}",
        "topic_prefix": prefix,
        "engine": engine,
        "model_dir": path.resolve(),
        "model_name": MODEL,
        "serving_host": "127.0.0.1",
        "serving_port": 0,
        "home_dir": home,
        "checkpoint_dir": store_root,
        "replica_id": name,
        "max_batch_size": args.batch_size,
        "batch_wait_ms": args.batch_wait_ms,
        "default_max_tokens": args.max_tokens,
        "max_model_len_tokens": args.max_model_len,
        "torch_threads": args.threads,
        "load_hold_max_s": args.load_hold_max_s,
        "log_level": "info",  # the weights_swapped lines are info
        "vllm_dtype": args.vllm_dtype,
        "vllm_enforce_eager": "true",
        "vllm_cpu_kvcache_space_gib": args.vllm_kv_cache_gib,
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLFEED_")}
    env |= {f"RLFEED_{k.upper()}": str(v) for k, v in settings.items()}
    env |= {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(REPO),
    }
    env.setdefault("OMP_NUM_THREADS", "1")
    if engine == "vllm" and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(index % (os.cpu_count() or 1))  # one core per replica
    return env


def run_engine(engine: str, bootstrap: str, path: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One engine's measured run (two replica children); returns its figures."""
    import httpx
    from safetensors.torch import load_file

    from services.checkpoints.store import CheckpointStore
    from services.kafka.topics import ensure_topics

    prefix = f"bench{uuid.uuid4().hex[:8]}."
    ensure_topics(bootstrap, prefix)
    root = work / engine
    store = CheckpointStore(root / "checkpoints")
    weights = {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}
    store.publish(MODEL, 0, weights, parent_version=None, full=True)
    python = VLLM_PYTHON if engine == "vllm" else Path(sys.executable)
    names = [f"swap-{engine}-{c}" for c in "ab"]
    reps = []
    for i, name in enumerate(names):
        env = replica_env(engine, name, i, bootstrap, prefix, path, store.root, root / f"home-{name}", args)
        (root / f"home-{name}").mkdir(parents=True, exist_ok=True)
        reps.append(ReplicaProcess(name, python, env, root / f"{name}.log"))
    clients: Clients | None = None
    try:
        for rep in reps:
            rep.start()
        urls = [wait_ready(rep, args.start_timeout_s) for rep in reps]
        startup_s = {rep.replica_id: round(time.time() - rep.started_at, 1) for rep in reps}
        clients = Clients(urls, args.clients, args.max_tokens)
        clients.start()
        started = time.time()
        wait_until(lambda: len(clients.outcomes) >= args.clients, 300, "the first requests", 0.05)
        produced: dict[int, float] = {}
        visible: dict[tuple[int, int], float] = {}
        delta_bytes: list[int] = []
        with httpx.Client(timeout=30) as poll:
            for version in range(1, args.versions + 1):
                time.sleep(args.interval_s)
                new = perturb(weights, seed=version, lr=args.step_lr)
                ev = store.publish(MODEL, version, new, parent_version=version - 1, full=False, parent_weights=weights)
                weights = new
                delta_bytes.append(ev.size_bytes)
                produced[version] = produce(bootstrap, prefix, ev)
                deadline = time.monotonic() + args.swap_timeout_s
                while sum((version, r) in visible for r in range(len(reps))) < len(reps):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"version {version} not served by both replicas in {args.swap_timeout_s} s")
                    for r, url in enumerate(urls):
                        if (version, r) not in visible and poll.get(f"{url}/health").json()[
                            "policy_version"
                        ] == version:
                            visible[(version, r)] = time.time()
                    time.sleep(0.02)
            time.sleep(args.interval_s)
            clients.stop()
            ended = time.time()
            metric_names = (
                "rlfeed_serving_weight_swaps_total",
                "rlfeed_serving_weight_swap_failures_total",
                "rlfeed_serving_completion_tokens_total",
            )
            metrics = {
                rep.replica_id: prometheus_totals(poll.get(f"{url}/metrics").text, metric_names)
                for rep, url in zip(reps, urls, strict=True)
            }
    finally:
        if clients is not None:
            clients.stop()
        for rep in reps:
            rep.stop()
    result = summarise(
        names, [swaps_in(rep.records()) for rep in reps], produced, visible, clients.outcomes, ended - started
    )
    return {
        "engine": engine,
        "python": str(python),
        "startup_s": startup_s,
        "delta_bytes_mean": int(sum(delta_bytes) / max(1, len(delta_bytes))),
        **result,
        "replica_metrics": {
            rid: {k.removeprefix("rlfeed_serving_"): v for k, v in m.items()} for rid, m in metrics.items()
        },
    }


def run(bootstrap: str, engines: list[str], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every engine in turn against the broker at `bootstrap`."""
    path, label = model_dir(args.model)
    out: dict[str, Any] = {"model": label}
    for engine in engines:
        try:
            out[engine] = run_engine(engine, bootstrap, path, args, work)
        except Exception as exc:
            out[engine] = {"engine": engine, "available": True, "error": f"{type(exc).__name__}: {exc}"[-6000:]}
        print(json.dumps({"engine_done": engine, "error": out[engine].get("error", "")[:300]}), file=sys.stderr)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--engines",
        default=None,
        help="comma-separated: transformers, vllm (default: both; vllm only when its venv exists)",
    )
    p.add_argument("--model", default="tiny", help="tiny (default, head_dim 64), full, or a model dir")
    p.add_argument("--versions", type=int, default=10, help="versions to publish per engine (K)")
    p.add_argument("--interval-s", type=float, default=1.0, help="pause before each publish")
    p.add_argument("--clients", type=int, default=4, help="client threads (half on each replica)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=512, help="max_model_len_tokens of the replicas")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per transformers replica (0: one per core)")
    p.add_argument("--vllm-dtype", default="float32", help="vLLM weight dtype (float32 on CPU: swaps stay bit-exact)")
    p.add_argument("--vllm-kv-cache-gib", type=int, default=1, help="vLLM CPU KV cache per replica, GiB")
    p.add_argument(
        "--load-hold-max-s",
        type=float,
        default=10.0,
        help="replicas' load_hold_max_s: new batches held off while a version materializes (0: none)",
    )
    p.add_argument("--step-lr", type=float, default=5e-5, help="every weight moves this much per version")
    p.add_argument("--start-timeout-s", type=float, default=600.0, help="longest wait for a replica to be ready")
    p.add_argument("--swap-timeout-s", type=float, default=120.0, help="longest wait for one version")
    args = p.parse_args()
    try:
        engines, missing = engines_to_run(args.engines, VLLM_PYTHON)
    except ValueError as exc:
        p.error(str(exc))
    # SIGTERM unwinds like Ctrl-C: the finally blocks stop the children and remove the temp dir.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored (`&`)

    with tempfile.TemporaryDirectory(prefix="rlfeed-swap-bench-") as tmp:
        work = Path(tmp)
        url = os.environ.get("RLFEED_KAFKA_URL")
        if not engines:
            broker_label, result = None, {"model": args.model}
        elif url:
            from services.kafka.url import bootstrap_servers

            broker_label = "RLFEED_KAFKA_URL"
            result = run(bootstrap_servers(url), engines, args, work)
        else:
            from services.kafka.embedded import EmbeddedBroker

            broker_label = "embedded"
            with EmbeddedBroker(work / "broker") as broker:
                result = run(broker.bootstrap, engines, args, work)
    for engine, why in missing.items():
        result[engine] = {"engine": engine, "available": False, "reason": why}
    per_engine = {e: result[e] for e in ENGINES if e in result}
    tps = {e: r.get("tokens_per_s") for e, r in per_engine.items()}
    print(
        json.dumps(
            {
                "bench": "swap",
                "command": " ".join([os.path.relpath(sys.executable, REPO), *sys.argv]),
                "broker": broker_label,
                "cpu_count": os.cpu_count(),
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "model": result["model"],
                "replicas_per_engine": 2,
                "versions_published": args.versions,
                "clients": args.clients,
                "max_tokens": args.max_tokens,
                "load_hold_max_s": args.load_hold_max_s,
                "engines": per_engine,
                "tokens_per_s": tps,
                "vllm_vs_transformers_tokens_per_s_ratio": round(tps["vllm"] / tps["transformers"], 2)
                if tps.get("vllm") and tps.get("transformers")
                else None,
            }
        )
    )
    if any("error" in r for r in per_engine.values()):
        sys.exit(1)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print(json.dumps({"bench": "swap", "interrupted": True}), file=sys.stderr)
        sys.exit(130)

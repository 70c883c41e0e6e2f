"""Hot swap under load: two replicas follow model-updates.v1 while clients keep sending requests.

Starts a real broker (the embedded one in a temp dir, or RLFEED_KAFKA_URL's), a checkpoint
store in a temp dir, and two replicas (ServerThread, in this process, on loopback) that
follow model-updates.v1. Client threads send `/v1/completions` requests without pause (each
pinned to one replica). The bench publishes K versions one after another: each a lossless
delta written with `CheckpointStore.publish`, then a ModelUpdateEvent produced on the
topic; it waits until both replicas serve it before the next. Prints one JSON object:

- `swap_pause_ms`: how long the engine's generation lock was held to copy the weights in
  (`Replica.swaps[].pause_s`; no batch runs meanwhile), p50/p99/max over every swap;
- `weight_load_ms`: update taken → version served (materialise + check + wait for the
  running batch + copy), p50/p99/max;
- `publish_to_serving_s`: produce time → the replica's own timestamp of serving the
  version, per replica and overall; `publish_to_visible_s`: produce time → the first
  `/health` poll (every 20 ms) that shows it;
- `requests`: total, failed (target 0), and how many overlapped a swap window;
- `tokens_per_s`: completion tokens of all successful requests over the run's wall time.

    .venv/bin/python bench/swap.py                      # tiny model, 10 versions
    .venv/bin/python bench/swap.py --model full --versions 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FULL_DIR = Path(".rlfeed/models/smollm2-135m-instruct")
TINY_DIR = Path(".rlfeed/test-cache/tiny-model")
MODEL = "bench-swap"


def model_dir(choice: str) -> tuple[Path, str]:
    """The model directory to serve and a label for it (built if needed)."""
    from services.localmodel.build import build

    if choice == "full":
        return build(FULL_DIR, "full"), "smollm2-135m-instruct"
    if choice == "tiny":
        return build(TINY_DIR, "tiny"), "tiny-random"
    return Path(choice), Path(choice).name


def percentiles(xs: list[float], scale: float = 1.0, digits: int = 3) -> dict[str, float | int | None]:
    """Nearest-rank p50/p99 and max of `xs` (times `scale`)."""
    if not xs:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    s = sorted(xs)

    def rank(q: float) -> float:
        return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]

    return {
        "n": len(s),
        "p50": round(rank(0.50) * scale, digits),
        "p99": round(rank(0.99) * scale, digits),
        "max": round(s[-1] * scale, digits),
    }


@dataclass
class Outcome:
    """One client request: wall-clock interval, success, tokens, and the version that served it."""

    started: float
    ended: float
    ok: bool
    tokens: int = 0
    version: int | None = None
    error: str | None = None


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

        url = f"{self.base_urls[i % len(self.base_urls)]}/completions"
        with httpx.Client(timeout=120) as http:
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
                        t0,
                        time.time(),
                        ok,
                        body.get("usage", {}).get("completion_tokens", 0) if ok else 0,
                        body.get("policy_version"),
                        None if ok else f"{r.status_code}: {r.text[:200]}",
                    )
                except Exception as exc:
                    out = Outcome(t0, time.time(), False, error=f"{type(exc).__name__}: {exc}")
                with self._lock:
                    self.outcomes.append(out)


def perturb(weights: dict[str, Any], seed: int, scale: float) -> dict[str, Any]:
    """A next 'training step': every float tensor moved by seeded noise of relative size `scale`."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in weights.items():
        if t.is_floating_point():
            out[k] = t + torch.randn(t.shape, generator=g, dtype=t.dtype) * (scale * float(t.abs().mean()) + 1e-8)
        else:
            out[k] = t.clone()
    return out


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


def wait_until(cond: Any, timeout_s: float, what: str, poll_s: float = 0.02) -> None:
    """Poll `cond` until true; raise after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


def run(bootstrap: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The measured run against a broker at `bootstrap`; returns the result fields."""
    import httpx
    from safetensors.torch import load_file

    from services.checkpoints.store import CheckpointStore
    from services.kafka.topics import ensure_topics
    from services.serving.server import ServerThread
    from services.serving.settings import ServingSettings

    path, label = model_dir(args.model)
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    ensure_topics(bootstrap, prefix)
    store = CheckpointStore(work / "checkpoints")
    weights = {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}
    store.publish(MODEL, 0, weights, parent_version=None, full=True)

    servers = []
    for name in ("a", "b"):
        settings = ServingSettings(
            kafka_url=f"kafka://{bootstrap}",
            topic_prefix=prefix,
            model_dir=path,
            model_name=MODEL,
            serving_port=0,
            home_dir=work / f"home-{name}",
            checkpoint_dir=store.root,
            replica_id=f"swap-bench-{name}",
            max_batch_size=args.batch_size,
            batch_wait_ms=args.batch_wait_ms,
            default_max_tokens=args.max_tokens,
            torch_threads=args.threads,
            log_level="warning",
        )
        servers.append(ServerThread(settings).start())
    try:
        for srv in servers:
            wait_until(lambda srv=srv: srv.replica.follower.caught_up.is_set(), 60, "the followers to catch up")
        clients = Clients([s.base_url for s in servers], args.clients, args.max_tokens)
        clients.start()
        started = time.time()
        wait_until(lambda: len(clients.outcomes) >= args.clients, 120, "the first requests", 0.05)
        produced: dict[int, float] = {}
        visible: dict[tuple[int, int], float] = {}
        delta_bytes: list[int] = []
        polls = [httpx.Client(base_url=f"http://127.0.0.1:{s.port}", timeout=30) for s in servers]
        try:
            for version in range(1, args.versions + 1):
                time.sleep(args.interval_s)
                new = perturb(weights, seed=version, scale=args.step_scale)
                ev = store.publish(MODEL, version, new, parent_version=version - 1, full=False, parent_weights=weights)
                weights = new
                delta_bytes.append(ev.size_bytes)
                produced[version] = produce(bootstrap, prefix, ev)
                deadline = time.monotonic() + args.swap_timeout_s
                while len([r for r in range(len(servers)) if (version, r) in visible]) < len(servers):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"version {version} not served by both replicas in {args.swap_timeout_s} s")
                    for r, client in enumerate(polls):
                        if (version, r) not in visible and client.get("/health").json()["policy_version"] == version:
                            visible[(version, r)] = time.time()
                    time.sleep(0.02)
            time.sleep(args.interval_s)
        finally:
            for c in polls:
                c.close()
            clients.stop()
        ended = time.time()
    finally:
        for srv in servers:
            srv.stop()

    outcomes = clients.outcomes
    swaps = [(i, s) for i, srv in enumerate(servers) for s in srv.replica.swaps]
    windows = [(s.served_at - s.load_s, s.served_at) for _, s in swaps]
    during = [o for o in outcomes if any(o.started <= b and o.ended >= a for a, b in windows)]
    serving_lat = {
        f"swap-bench-{'ab'[i]}": [
            s.served_at - produced[s.version] for j, s in swaps if j == i and s.version in produced
        ]
        for i in range(len(servers))
    }
    all_lat = [x for xs in serving_lat.values() for x in xs]
    visible_lat = [t - produced[v] for (v, _), t in visible.items()]
    tokens = sum(o.tokens for o in outcomes if o.ok)
    failed = [o for o in outcomes if not o.ok]
    p99 = percentiles(all_lat)["p99"]
    return {
        "model": label,
        "replicas": len(servers),
        "versions_published": args.versions,
        "delta_bytes_mean": int(sum(delta_bytes) / max(1, len(delta_bytes))),
        "swap_pause_ms": percentiles([s.pause_s for _, s in swaps], 1000.0),
        "weight_load_ms": percentiles([s.load_s for _, s in swaps], 1000.0, 1),
        "weight_load_ms_by_version": {str(s.version): round(s.load_s * 1000.0, 1) for i, s in swaps if i == 0},
        "publish_to_serving_s": {
            **percentiles(all_lat),
            "by_replica": {k: [round(x, 3) for x in v] for k, v in serving_lat.items()},
        },
        "publish_to_visible_s": percentiles(visible_lat),
        "requests": {
            "total": len(outcomes),
            "failed": len(failed),
            "overlapping_a_swap": len(during),
            "failed_overlapping_a_swap": sum(1 for o in during if not o.ok),
            "versions_served": sorted({o.version for o in outcomes if o.ok and o.version is not None}),
            "first_errors": [o.error for o in failed[:3]],
        },
        "completion_tokens": tokens,
        "seconds": round(ended - started, 2),
        "tokens_per_s": round(tokens / (ended - started), 2),
        "targets": {
            "publish_to_serving_p99_lt_5s": p99 is not None and p99 < 5.0,
            "zero_failed_requests": not failed,
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny (default), full, or a model dir")
    p.add_argument("--versions", type=int, default=10, help="versions to publish (K)")
    p.add_argument("--interval-s", type=float, default=1.0, help="pause before each publish")
    p.add_argument("--clients", type=int, default=4, help="client threads (half on each replica)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (0: one per core)")
    p.add_argument("--step-scale", type=float, default=1e-3, help="relative size of each version's change")
    p.add_argument("--swap-timeout-s", type=float, default=120.0, help="longest wait for one version")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="rlfeed-swap-bench-") as tmp:
        work = Path(tmp)
        url = os.environ.get("RLFEED_KAFKA_URL")
        if url:
            from services.kafka.url import bootstrap_servers

            broker_label = "RLFEED_KAFKA_URL"
            result = run(bootstrap_servers(url), args, work)
        else:
            from services.kafka.embedded import EmbeddedBroker

            broker_label = "embedded"
            with EmbeddedBroker(work / "broker") as broker:
                result = run(broker.bootstrap, args, work)
    print(
        json.dumps(
            {
                "bench": "swap",
                "engine": "transformers",
                "broker": broker_label,
                "cpu_count": os.cpu_count(),
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "clients": args.clients,
                "max_tokens": args.max_tokens,
                **result,
                "vllm": "tokens/s of both engines: bench/serving.py --engines transformers,vllm "
                "(run with .rlfeed/venv-vllm/bin/python); the vLLM swap: tests/test_serving_vllm.py",
            }
        )
    )


if __name__ == "__main__":
    main()

"""Serving throughput, batched vs unbatched, against the real replica server.

Starts the HTTP server in-process twice on loopback (max_batch_size=1, then the batched
size), fires the same closed-loop load at each (`--concurrency` clients sending
`/v1/completions` requests until `--requests` are done) and prints one JSON object:
completion tokens/s and requests/s of each, and their ratios. No Kafka (events are
dropped and counted), no timing assertions.

    .venv/bin/python bench/serving.py                       # full model if built, else tiny
    .venv/bin/python bench/serving.py --model tiny --requests 64 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FULL_DIR = Path(".rlfeed/models/smollm2-135m-instruct")
TINY_DIR = Path(".rlfeed/test-cache/tiny-model")


def model_dir(choice: str) -> tuple[Path, str]:
    """The model directory to serve and a label for it (builds tiny if needed)."""
    from services.localmodel.build import build, is_built

    if choice == "full" or (choice == "auto" and is_built(FULL_DIR)):
        return build(FULL_DIR, "full"), "smollm2-135m-instruct"
    if choice in ("tiny", "auto"):
        return build(TINY_DIR, "tiny"), "tiny-random"
    return Path(choice), Path(choice).name


async def load(base_url: str, model: str, n_requests: int, concurrency: int, max_tokens: int) -> dict[str, float]:
    """Closed-loop load: `concurrency` workers share `n_requests`; returns throughput figures."""
    import httpx

    todo = iter(range(n_requests))
    tokens = 0
    latencies: list[float] = []

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        for i in todo:
            t0 = time.perf_counter()
            r = await client.post(
                f"{base_url}/completions",
                json={
                    "model": model,
                    "prompt": f"Request {i}: write a short story about a robot.",
                    "max_tokens": max_tokens,
                    "temperature": 1.0,
                    "seed": i,
                },
            )
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600) as client:
        # One warm-up request (first forward pass allocates).
        await client.post(f"{base_url}/completions", json={"model": model, "prompt": "warm", "max_tokens": 2})
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": n_requests,
        "completion_tokens": tokens,
        "seconds": round(elapsed, 3),
        "tokens_per_s": round(tokens / elapsed, 2),
        "requests_per_s": round(n_requests / elapsed, 3),
        "latency_p50_s": round(latencies[len(latencies) // 2], 3),
        "latency_p95_s": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.95))], 3),
    }


def run_one(path: Path, batch: int, args: argparse.Namespace) -> dict[str, float]:
    from services.serving.server import ServerThread
    from services.serving.settings import ServingSettings

    settings = ServingSettings(
        model_dir=path,
        model_name="bench",
        serving_port=0,
        home_dir=Path(tempfile.mkdtemp(prefix="rlfeed-bench-")),
        kafka_url=None,
        follow_updates=False,
        max_batch_size=batch,
        batch_wait_ms=args.batch_wait_ms,
        torch_threads=args.threads,
        log_level="warning",
    )
    with ServerThread(settings) as srv:
        out = asyncio.run(load(srv.base_url, "bench", args.requests, args.concurrency, args.max_tokens))
        count = srv.replica.metrics.batch_size.collect()[0].samples
        n_batches = next(s.value for s in count if s.name.endswith("_count"))
        out["batches"] = int(n_batches)
        out["mean_batch_size"] = round(args.requests / max(1, n_batches - 1), 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="auto", help="auto (full if built, else tiny), full, tiny, or a model dir")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16, help="max_batch_size of the batched run")
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: one per core)")
    args = p.parse_args()
    os.environ.pop("RLFEED_KAFKA_URL", None)
    path, label = model_dir(args.model)
    unbatched = run_one(path, 1, args)
    batched = run_one(path, args.batch_size, args)
    print(
        json.dumps(
            {
                "bench": "serving",
                "engine": "transformers",
                "model": label,
                "cpu_count": os.cpu_count(),
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "requests": args.requests,
                "concurrency": args.concurrency,
                "max_tokens": args.max_tokens,
                "unbatched": unbatched,
                "batched": batched,
                "tokens_per_s_ratio": round(batched["tokens_per_s"] / unbatched["tokens_per_s"], 2),
                "requests_per_s_ratio": round(batched["requests_per_s"] / unbatched["requests_per_s"], 2),
            }
        )
    )


if __name__ == "__main__":
    main()

"""Serving throughput, batched vs unbatched, against the real replica server.

Starts the HTTP server in-process twice on loopback (max_batch_size=1, then the batched
size), fires the same closed-loop load at each (`--concurrency` clients sending
`/v1/completions` requests until `--requests` are done) and prints one JSON object:
completion tokens/s and requests/s of each, and their ratios. No Kafka (events are
dropped and counted), no timing assertions.

`--engines transformers,vllm` also runs the batched load on the vLLM engine (same model,
same settings; needs vllm importable: the separate venv of `ops/bootstrap.sh vllm`) and adds
its figures and the vllm / transformers tokens/s ratio, both measured in the same run. With
both engines, vLLM runs in a child process: vLLM's CPU backend pins torch's thread count, and
a transformers engine in the same process (torch_threads=1) makes its attention kernel abort.

    .venv/bin/python bench/serving.py                       # full model if built, else tiny
    .venv/bin/python bench/serving.py --model tiny --requests 64 --concurrency 16
    .rlfeed/venv-vllm/bin/python bench/serving.py --model full --engines transformers,vllm
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
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


def run_one(path: Path, batch: int, args: argparse.Namespace, engine: str = "transformers") -> dict[str, float]:
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
        engine=engine,
        vllm_dtype=args.vllm_dtype,
        vllm_enforce_eager=not args.vllm_compile,
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
    p.add_argument("--engines", default="transformers", help="comma-separated: transformers, vllm")
    p.add_argument("--vllm-dtype", default="bfloat16", help="vLLM engine weight dtype")
    p.add_argument("--vllm-compile", action="store_true", help="let vLLM torch.compile (minutes on CPU)")
    args = p.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not set(engines) <= {"transformers", "vllm"} or not engines:
        p.error(f"--engines: unknown engine in {args.engines!r} (transformers, vllm)")
    os.environ.pop("RLFEED_KAFKA_URL", None)
    path, label = model_dir(args.model)
    out: dict[str, object] = {
        "bench": "serving",
        "engine": ",".join(engines),
        "model": label,
        "cpu_count": os.cpu_count(),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
    }
    if "transformers" in engines:
        unbatched = run_one(path, 1, args)
        batched = run_one(path, args.batch_size, args)
        out |= {
            "unbatched": unbatched,
            "batched": batched,
            "tokens_per_s_ratio": round(batched["tokens_per_s"] / unbatched["tokens_per_s"], 2),
            "requests_per_s_ratio": round(batched["requests_per_s"] / unbatched["requests_per_s"], 2),
        }
    if engines == ["vllm"]:
        vllm = run_one(path, args.batch_size, args, engine="vllm")
    elif "vllm" in engines:
        argv = [
            *("--model", str(path), "--requests", str(args.requests), "--concurrency", str(args.concurrency)),
            *("--max-tokens", str(args.max_tokens), "--batch-size", str(args.batch_size)),
            *("--batch-wait-ms", str(args.batch_wait_ms), "--vllm-dtype", args.vllm_dtype, "--engines", "vllm"),
            *(["--vllm-compile"] if args.vllm_compile else []),
        ]
        child = subprocess.run(
            [sys.executable, __file__, *argv],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        vllm = json.loads(child.stdout.strip().splitlines()[-1])["vllm"]
    if "vllm" in engines:
        out |= {"vllm": vllm | {"dtype": args.vllm_dtype, "compiled": args.vllm_compile}}  # type: ignore[operator]
        if "transformers" in engines:
            ratio = vllm["tokens_per_s"] / out["batched"]["tokens_per_s"]  # type: ignore[index]
            out["vllm_vs_transformers_batched_tokens_per_s_ratio"] = round(ratio, 2)
    out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

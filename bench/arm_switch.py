"""What a canary candidate costs the vLLM engine: weight reloads between the two arms.

The vLLM engine holds the stable and candidate weights as CPU tensors and loads one of them
into its single vLLM engine when a batch's arm differs from the set loaded
(services/serving/engines/vllm.py). This bench builds one engine, loads a candidate, and
prints one JSON object:
- `reload`: wall and CPU seconds of one full reload (median of `--reloads`), next to the
  wall time of one batch of `--max-batch-size` rows x `--max-tokens` tokens measured in
  the same run (`reload_per_batch`: the ratio);
- for each `--holds-ms` value, a closed-loop load (`--concurrency` clients, `--requests` in
  all, each request on the candidate with probability `--candidate-share`, seeded): batches,
  arm switches, switches per batch, seconds spent switching, requests/s, and the candidate
  arm's mean / max wait in the queue.
Engine-level (no HTTP, no Kafka). Needs vllm importable (the separate venv):

    .rlfeed/venv-vllm/bin/python bench/arm_switch.py                  # SmolLM2 if built, else tiny
    .rlfeed/venv-vllm/bin/python bench/arm_switch.py --model tiny --requests 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FULL_DIR = Path(".rlfeed/models/smollm2-135m-instruct")
TINY_DIR = Path(".rlfeed/test-cache/tiny-vllm-model")


def model_dir(choice: str) -> Path:
    """The model to serve: SmolLM2 (if built), or a tiny random model vLLM's CPU kernels accept."""
    from services.localmodel.build import build, is_built

    if choice == "full" or (choice == "auto" and is_built(FULL_DIR)):
        return build(FULL_DIR, "full")
    if choice in ("tiny", "auto"):
        return tiny_dir()
    return Path(choice)


def tiny_dir() -> Path:
    """The project's tiny model with head_dim 64 (vLLM's CPU attention needs 32..512)."""
    from services.localmodel.build import build, build_vllm_tiny

    return build_vllm_tiny(TINY_DIR, build(Path(".rlfeed/test-cache/tiny-model"), "tiny"))


def make_job(loop: asyncio.AbstractEventLoop, prompt: list[int], max_tokens: int, candidate: bool) -> Any:
    from services.serving.engines.base import Job
    from services.serving.params import GenParams

    params = GenParams(max_tokens=max_tokens, temperature=1.0, seed=1)
    job = Job(prompt, params, decode=lambda ids: "", loop=loop, stream=False)
    job.candidate = candidate
    return job


def run_all(engine: Any, jobs: list[Any]) -> float:
    """Submit `jobs` at once and wait for them; wall seconds."""
    started = time.perf_counter()
    for job in jobs:
        engine.submit(job)
    while not all(j.done for j in jobs):
        time.sleep(0.002)
    return time.perf_counter() - started


def closed_loop(engine: Any, args: argparse.Namespace, loop: asyncio.AbstractEventLoop, seed: int) -> dict[str, Any]:
    """`concurrency` clients, each sending its next request when the last one finished."""
    rng = random.Random(seed)
    arms = [rng.random() < args.candidate_share for _ in range(args.requests)]
    todo = iter(range(args.requests))
    lock = threading.Lock()
    waits: dict[bool, list[float]] = {True: [], False: []}
    batches = [0]
    hook = engine.on_batch
    engine.on_batch = lambda batch, s: batches.__setitem__(0, batches[0] + 1)
    switches, switch_s = engine.arm_switches, engine.arm_switch_s

    def client(k: int) -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            job = make_job(loop, [100 + (i * 37 + j) % 5000 for j in range(16)], args.max_tokens, arms[i])
            started = time.perf_counter()
            engine.submit(job)
            while job.version is None:  # set when its batch starts
                time.sleep(0.0005)
            waited = time.perf_counter() - started
            while not job.done:
                time.sleep(0.002)
            with lock:
                waits[arms[i]].append(waited)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    engine.on_batch = hook
    n_switches = engine.arm_switches - switches
    return {
        "requests": args.requests,
        "candidate_requests": sum(arms),
        "batches": batches[0],
        "arm_switches": n_switches,
        "switches_per_batch": round(n_switches / max(1, batches[0]), 3),
        "switch_s": round(engine.arm_switch_s - switch_s, 3),
        "switch_share_of_wall": round((engine.arm_switch_s - switch_s) / wall, 3),
        "requests_per_s": round(args.requests / wall, 2),
        "candidate_queue_wait_mean_s": round(statistics.fmean(waits[True]), 3) if waits[True] else None,
        "candidate_queue_wait_max_s": round(max(waits[True]), 3) if waits[True] else None,
        "stable_queue_wait_mean_s": round(statistics.fmean(waits[False]), 3) if waits[False] else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="auto", help="auto | full | tiny | a model directory")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reloads", type=int, default=5)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=24, help="closed-loop clients (above the batch size: a queue)")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--candidate-share", type=float, default=0.1)
    ap.add_argument("--holds-ms", default="0,200", help="comma-separated arm_switch_hold_ms values")
    args = ap.parse_args()

    from services.serving.engines.vllm import VllmEngine
    from services.serving.settings import ServingSettings

    path = model_dir(args.model)
    settings = ServingSettings(
        engine="vllm",
        model_dir=path,
        home_dir=Path(tempfile.mkdtemp(prefix="rlfeed-armbench-")),
        vllm_dtype=args.dtype,
        vllm_enforce_eager=True,
        vllm_cpu_kvcache_space_gib=1,
        max_batch_size=args.max_batch_size,
        max_model_len_tokens=256,
        follow_updates=False,
    )
    engine = VllmEngine(settings)
    loop = asyncio.new_event_loop()
    try:
        stable = engine.state_dict()
        engine.set_candidate(1, {k: t * 1.01 if "mlp" in k else t for k, t in stable.items()})
        engine.start()
        prompt = [100 + j for j in range(16)]
        rows = args.max_batch_size
        run_all(engine, [make_job(loop, prompt, args.max_tokens, False) for _ in range(rows)])  # warm-up
        batch_s = statistics.median(
            run_all(engine, [make_job(loop, prompt, args.max_tokens, False) for _ in range(rows)]) for _ in range(3)
        )
        walls, cpus = [], []
        for i in range(args.reloads):
            with engine.generation_lock:
                t0, c0 = time.perf_counter(), time.process_time()
                engine._use_candidate(i % 2 == 0)
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
        out: dict[str, Any] = {
            "model": str(path),
            "dtype": args.dtype,
            "parameters": sum(t.numel() for t in stable.values()),
            "reload": {
                "wall_s": round(statistics.median(walls), 4),
                "cpu_s": round(statistics.median(cpus), 4),
                "batch_wall_s": round(batch_s, 4),
                "batch_rows": rows,
                "batch_max_tokens": args.max_tokens,
                "reload_per_batch": round(statistics.median(walls) / batch_s, 3),
            },
        }
        for hold in [float(h) for h in args.holds_ms.split(",")]:
            engine.arm_switch_hold_s = hold / 1000.0
            out[f"hold_{hold:g}ms"] = closed_loop(engine, args, loop, seed=7)
        print(json.dumps(out))
    finally:
        engine.stop()
        engine.close()
        loop.close()


if __name__ == "__main__":
    main()

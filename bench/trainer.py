"""Trainer benchmark: pipelined vs synchronous on the same data, and delta vs full size.

Produces one set of samples to a fresh topic, trains on all of it from offset 0 once per
mode (fresh state each time), and prints one JSON object: steps/s and samples/s of each
(from the first batch to the end of the last step), the ratios, where a step's time goes,
and the size of the published delta (version 1 against version 0) next to the full
snapshot (version 0). The modes:

* `synchronous`: read, batch, the reference's forward (KL term) and the policy's
  forward/backward + AdamW one after the other on one thread, `--threads` intra-op threads;
* `pipelined`: reading, batching and the reference's forward on the reader thread while the
  optimiser thread trains (each with `--threads` intra-op threads: 2x the threads);
* `synchronous_2x_threads`: the synchronous loop with 2x `--threads` intra-op threads, the
  same core budget as `pipelined` (the fair baseline on a machine with that many cores);
* `pipelined_bf16` (with `--bf16`): `pipelined` under bf16 autocast, to measure it on CPU;
* `pipelined_publish_inline` and `pipelined_publish_background` (with
  `--publish-every-steps N`): `pipelined` with one sample in 8 held out and a gated
  publish every N steps, on the optimiser's thread (it waits: `publish_wait_s`) or on the
  publisher thread (`publish_in_background`, the default) while the optimiser steps on.

Per mode, `stages_s` is the pipeline stage's time by part (`consume`: the Kafka client,
`decode`: decoding and routing, `collate`: padding, `prepare`: the reference's forward),
`step_s` the optimiser's time in steps (`step_cpu_s` its thread's CPU time),
`batch_wait_s` the optimiser's time between steps (the whole pipeline stage when
synchronous; starvation when pipelined), `handoff_s` the reader blocked on a full queue
(ahead of the optimiser). `predicted_max_speedup` of the synchronous run is what its own
stage times allow a two-thread pipeline at best: (stage + step) / max(stage, step), the
figure to read `pipelined_vs_sync_samples_per_s` against (a CPU-bound overlap on two
cores cannot do better, and does worse when the cores are shared).

    .venv/bin/python bench/trainer.py [--samples 384] [--model-dir DIR] [--threads 1] [--bf16]
        [--publish-every-steps N]

Uses RLFEED_KAFKA_URL when set, else starts an embedded broker. Default model: the tiny
random Llama of the tests (real tokenizer, 49k vocabulary); `--model-dir` takes any HF
directory, e.g. the full SmolLM2-135M from `rlfeed model build`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
import uuid
from pathlib import Path

from services.kafka.producers import producer_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_samples(n: int, model: str, vocab: int, seed: int = 0) -> list:
    from schemas.events import SampleEvent, SettleReason

    rng = random.Random(seed)
    out = []
    for i in range(n):
        g = i // 4  # four completions per prompt: group-relative advantages
        prompt = [1 + (g * 7 + k) % (vocab - 1) for k in range(24)]
        completion = [rng.randrange(10, vocab) for _ in range(rng.randint(16, 48))]
        out.append(
            SampleEvent(
                generation_id=f"bench-{seed}-{i}",
                model=model,
                policy_version=0,
                prompt="p " * 24,
                completion="c " * len(completion),
                prompt_token_ids=prompt,
                completion_token_ids=completion,
                completion_logprobs=[-rng.uniform(3.0, 9.0) for _ in completion],
                reward=rng.choice([0.0, 1.0]),
                reward_components={"accept": 1.0},
                feedback_event_ids=[uuid.uuid4().hex],
                settle_reason=SettleReason.TERMINAL,
                user_id="bench",
                generated_at_ms=1,
            )
        )
    return out


STAGES = ("consume_s", "decode_s", "collate_s", "prepare_s")
"""The pipeline stage's parts, in order: the client's consume (waiting for the stream
included), decoding and routing, padding, the reference's forward."""


def pipeline_bound(stages: dict[str, float], step_s: float) -> float:
    """The most a two-thread pipeline can gain over doing the same work one after the
    other: (pipeline stage + optimiser step) / the slower of the two. Measured on the
    synchronous run (one thread, every part uncontended), it is what pipelining can
    predict at best, on two free cores."""
    prep = sum(stages.values())
    slow = max(prep, step_s)
    return round((prep + step_s) / slow, 3) if slow > 0 else 1.0


def run_once(settings, bootstrap: str) -> tuple[dict[str, float], object]:
    from services.trainer.loop import Trainer

    trainer = Trainer(settings, bootstrap)
    stats = trainer.run(idle_exit_s=20.0)  # generous: a loaded machine starts slowly
    active = stats["last_step_at"] - stats["first_batch_at"]
    # The first batch's wait is not in `active`; one step's time is, in both modes.
    # Stage times cover every batch (the first's too); `batch_wait_s` the optimiser's
    # time between the end of one step and the start of the next (reading and preparing
    # inline when synchronous, starved by the pipeline when pipelined).
    stages = {k: round(stats[f"reader_{k}"], 3) for k in STAGES}
    n = max(stats["steps"], 1)
    return {
        "stages_s": stages,
        "step_s": round(stats["step_s"], 3),
        "step_cpu_s": round(stats["step_cpu_s"], 3),
        "stage_cpu_s": round(stats["reader_stage_cpu_s"], 3),
        "prepare_cpu_s": round(stats["reader_prepare_cpu_s"], 3),
        "batch_wait_s": round(stats["batch_wait_s"], 3),
        "handoff_s": round(stats["reader_handoff_s"], 3),
        "per_step_ms": {
            **{k.removesuffix("_s"): round(1000 * v / n, 1) for k, v in stages.items()},
            "step": round(1000 * stats["step_s"] / n, 1),
            "batch_wait": round(1000 * stats["batch_wait_s"] / max(n - 1, 1), 1),
        },
        "predicted_max_speedup": pipeline_bound(stages, stats["step_s"]),
        # the same from CPU seconds: what the work allows on two free cores, whatever
        # the load on this machine while it was measured
        "predicted_max_speedup_cpu": pipeline_bound({"stage": stats["reader_stage_cpu_s"]}, stats["step_cpu_s"]),
        "ref_rows": stats["ref_rows"],
        "ref_rows_skipped": stats["ref_rows_skipped"],
        "steps": stats["steps"],
        "samples": stats["samples"],
        "optimizer_steps": stats["optimizer_steps"],
        "active_s": round(active, 3),
        "optimiser_busy_frac": round(stats["step_s"] / active, 3) if active else 0.0,
        "steps_per_s": round(stats["steps"] / active, 3),
        "samples_per_s": round(stats["samples"] / active, 2),
        "publish_wait_s": round(stats["publish_wait_s"], 3),
        "published": stats.get("published", 0),
        "gate_refused": stats.get("gate_refused", 0),
    }, trainer


def ratio(results: dict[str, dict[str, float]], mode: str) -> float:
    """samples/s of `mode` over the synchronous loop's, same data, same run."""
    return round(results[mode]["samples_per_s"] / max(results["synchronous"]["samples_per_s"], 1e-9), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="also run the pipelined loop under bf16 autocast")
    ap.add_argument("--no-2x", action="store_true", help="skip the synchronous_2x_threads mode")
    ap.add_argument(
        "--publish-every-steps",
        type=int,
        default=0,
        help="also run pipelined with gated publishing every N steps, inline and in the background",
    )
    args = ap.parse_args()

    import logging

    from confluent_kafka import Producer

    from schemas.codec import encode, key_of
    from schemas.topics import SAMPLES
    from services.kafka.topics import ensure_topics
    from services.localmodel.build import build
    from services.trainer.settings import TrainerSettings

    logging.disable(logging.INFO)
    model_dir = args.model_dir or build(ROOT / ".rlfeed" / "test-cache" / "tiny-model", "tiny")
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rlfeed-bench-")))
        url = os.environ.get("RLFEED_KAFKA_URL")
        if url:
            from services.kafka.url import bootstrap_servers

            bootstrap = bootstrap_servers(url)
        else:
            from services.kafka.embedded import EmbeddedBroker

            bootstrap = stack.enter_context(EmbeddedBroker(work / "broker")).bootstrap
        prefix = f"bench{uuid.uuid4().hex[:8]}."
        ensure_topics(bootstrap, prefix)
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(model_dir))
        samples = make_samples(args.samples, "bench-policy", vocab)
        producer = Producer({**producer_config(bootstrap), "linger.ms": 20})
        for ev in samples:
            producer.produce(SAMPLES.full_name(prefix), encode(ev), key=key_of(ev, SAMPLES.key))
        producer.flush(60)

        results = {}
        trainers = {}
        modes = ["synchronous", "pipelined"] + ([] if args.no_2x else ["synchronous_2x_threads"])
        modes += ["pipelined_bf16"] if args.bf16 else []
        publishing = ["pipelined_publish_inline", "pipelined_publish_background"]
        modes += publishing if args.publish_every_steps else []
        for mode in modes:
            publish = mode in publishing
            settings = TrainerSettings(
                _env_file=None,
                home_dir=work / mode,
                topic_prefix=prefix,
                model_name="bench-policy",
                model_dir=model_dir,
                checkpoint_dir=work / (f"store-{mode}" if publish else "store"),  # versions raise staleness
                pipelined=mode.startswith("pipelined"),
                trainer_bf16=mode.endswith("bf16"),
                trainer_device="cpu",
                follow_rollbacks=False,
                trainer_batch_size=args.batch_size,
                trainer_micro_batch_size=args.batch_size,
                trainer_batch_wait_s=1.0,
                heldout_every=8 if publish else 10**9,
                trainer_torch_threads=args.threads * (2 if mode.endswith("2x_threads") else 1),
                checkpoint_every_steps=10**9,
                checkpoint_every_s=10**9,
                publish_every_s=0,
                publish_every_steps=args.publish_every_steps if publish else 0,
                publish_in_background=mode.endswith("background"),
                gate_enabled=publish,
                gate_min_heldout=2,
                lr=5e-5,
                kl_coef=0.05,
            )
            results[mode], trainers[mode] = run_once(settings, bootstrap)
            # as it goes (stderr): a failure in a later mode or in the publish keeps these
            print(json.dumps({"mode": mode, **results[mode]}), file=sys.stderr, flush=True)

        trainer = trainers["pipelined"]
        full = trainer.store.manifest("bench-policy", 0)
        delta_ev = trainer.publish()
        assert delta_ev is not None
        from services.checkpoints import delta as deltacodec

        rebuilt = trainer.store.materialize("bench-policy", delta_ev.version)
        bit_exact = deltacodec.weights_sha256(rebuilt) == delta_ev.weights_sha256
        n_params = sum(p.numel() for p in trainer.model.parameters())
        out = {
            "bench": "trainer",
            "model_dir": str(model_dir),
            "parameters": n_params,
            "samples_produced": args.samples,
            "batch_size": args.batch_size,
            "torch_threads": args.threads,
            "cpu_count": os.cpu_count(),
            **results,
            **{f"{m}_vs_sync_samples_per_s": ratio(results, m) for m in modes if m != "synchronous"},
            # what the synchronous run's own stage times allow a 2-thread pipeline at best
            "pipelined_vs_sync_predicted_max": results["synchronous"]["predicted_max_speedup"],
            "pipelined_vs_sync_predicted_max_cpu": results["synchronous"]["predicted_max_speedup_cpu"],
            # CPU seconds per sample, both threads: above 1, the pipelined run paid extra
            # CPU for the same work (contention: GIL, caches, memory bandwidth)
            "pipelined_vs_sync_cpu_per_sample": round(
                (results["pipelined"]["step_cpu_s"] + results["pipelined"]["stage_cpu_s"])
                / max(results["synchronous"]["step_cpu_s"] + results["synchronous"]["stage_cpu_s"], 1e-9),
                3,
            ),
            "full_snapshot_bytes": full.size_bytes,
            "delta_bytes": delta_ev.size_bytes,
            "delta_vs_full": round(delta_ev.size_bytes / full.size_bytes, 4),
            "delta_optimizer_steps": trainer.meta.optimizer_steps,
            "delta_bit_exact": bit_exact,
            "delta_codec": deltacodec.default_codec(),
        }
        print(json.dumps(out))


if __name__ == "__main__":
    main()

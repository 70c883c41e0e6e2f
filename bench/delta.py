"""Delta codec benchmark on real optimiser steps of the project's model.

Trains the model (default: SmolLM2-135M-Instruct from `rlfeed model build`, fp32) for a
few AdamW steps (the trainer's defaults: lr 5e-5, betas 0.9/0.99, clip 1.0) on the
trainer's own policy-gradient loss over a few short sequences, keeps the weights after
steps 0, 1, 9 and 10, and encodes the deltas

* `1_step`: version 0 -> 1 (the first step; Adam's first update moves every parameter
  with a gradient by about lr),
* `1_step_late`: version 9 -> 10 (one step once Adam's moments have warmed up),
* `10_steps`: version 0 -> 10,

for fp32 weights and for bf16 weights (mixed precision: the optimiser keeps fp32 master
weights, the bf16 cast is what gets published, so most bf16 elements do not move in one
small step). Every delta is applied again and checked bit for bit against the weights it
encodes. Prints one JSON object: per dtype and delta the compression ratio (full
snapshot bytes / delta bytes), the modes chosen per tensor, the fraction of changed
elements, and encode/decode throughput in GB/s of full state-dict bytes (encode computes
both checksums; decode verifies both, as `CheckpointStore` does), with the CPU seconds
of each (all threads; the figure to compare on a shared machine). Next to each ratio,
`entropy_bound_ratio`: full bytes over the empirical entropy of the change under the
codec's own model (which elements changed: coin flips per exponent class of the base;
the changed elements' differences: i.i.d. per class), split into positions and values.
It bounds coders of that model only: `ricesm` mode beats it on the values, because zstd
also codes the runs of equal magnitudes (more context than i.i.d. per class). Measured
on the 1-step bf16 delta (one-off analyses, not part of this bench): what else
the neighbours tell adds little under this model (the left and upper neighbour's change
take ~2% off the positions' entropy; the row's and column's majority direction ~0.3%
off the values'); the one strong context is an artefact of this model's Q4_1 origin
(equal weights in a 32-block move together: ~15% off the joint entropy at 1 step).

What the trainer publishes today is the fp32 row: it trains and publishes fp32 weights
(`services.trainer.policy.load`), so the bf16 rows describe a bf16 publish of fp32
master weights, which the trainer does not do (yet).

    .venv/bin/python bench/delta.py [--model-dir DIR] [--threads 1] [--decode-threads 1]
        [--snapshots DIR] [--small-lr 1e-6]

`results` (and `targets`) are at the trainer's default lr. `results_small_lr` repeats
everything for a second training run at `--small-lr` (default 1e-6, typical of RL
fine-tuning of LLMs; 0 skips it): a separate, labelled row, not the headline.

`--snapshots DIR` keeps the trained fp32 weights in DIR (safetensors) and reuses them on
the next run, to iterate on the codec without training again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.checkpoints import delta as deltacodec  # noqa: E402

KEPT_STEPS = (0, 1, 9, 10)
PAIRS = {"1_step": (0, 1), "1_step_late": (9, 10), "10_steps": (0, 10)}


def _texts(step: int) -> list[tuple[str, str, float]]:
    """The step's (prompt, completion, reward) triples: four sums, each answered once
    right (reward 1) and once wrong (reward 0), so every prompt is a group of two with
    advantages +-0.5, as the trainer computes them. A fresh batch every step."""
    out = []
    for i in range(4):
        a, b = 7 + 13 * step + 5 * i, 3 + 11 * i + 17 * step
        prompt = f"What is {a} plus {b}? Answer with one sentence."
        out.append((prompt, f"{a} plus {b} equals {a + b}.", 1.0))
        out.append((prompt, f"{a} plus {b} equals {a + b + 1 + i}.", 0.0))
    return out


def _batch(tokenizer, pad_id: int, step: int) -> tuple[dict[str, torch.Tensor], list[float], list[str]]:
    """Input ids, attention mask and completion mask (B, L-1) of the step's sequences,
    with their rewards and prompts."""
    rows, comp, rewards, prompts = [], [], [], []
    for prompt, completion, reward in _texts(step):
        p = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        if not isinstance(p, list):
            p = p["input_ids"]
        c = tokenizer(completion)["input_ids"]
        rows.append(list(p) + c)
        comp.append(len(p))
        rewards.append(reward)
        prompts.append(prompt)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    cmask = torch.zeros((len(rows), width - 1))
    for i, (r, start) in enumerate(zip(rows, comp, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
        cmask[i, start - 1 : len(r) - 1] = 1.0  # position j predicts token j+1
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": cmask}, rewards, prompts


def default_lr() -> float:
    """The trainer's default learning rate (the headline figures use it)."""
    from services.trainer.settings import TrainerSettings

    return float(TrainerSettings.model_fields["lr"].default)


def train(model_dir: Path, steps: int, lr: float) -> tuple[dict[int, dict[str, torch.Tensor]], dict[str, object]]:
    """fp32 weights after each step in KEPT_STEPS, and training figures."""
    from services.trainer import losses, policy

    model, tokenizer = policy.load(model_dir)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    kept = {0: policy.copy_weights(model)}
    t0 = time.perf_counter()
    last: dict[str, float] = {}
    tokens = 0
    for step in range(1, steps + 1):
        batch, rewards, prompts = _batch(tokenizer, policy.pad_id(tokenizer), step)
        adv, _ = losses.advantages(rewards, prompts, None, 0.99)
        mask = batch["completion_mask"]
        tokens += int(mask.sum())
        logp = policy.token_logprobs(model, batch["input_ids"], batch["attention_mask"], mask)
        # The sampler: this policy, up to sampling-side numerics (on-policy, ratio ~1).
        sampler = logp.detach() + 0.01 * torch.randn(logp.shape, generator=gen) * mask
        loss, st = losses.total_loss(
            logp, sampler, None, torch.tensor(adv, dtype=torch.float32), mask, kl_coef=0.0, ratio_max=2.0
        )
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        last = {**st, "loss": float(loss.detach()), "grad_norm": float(grad_norm)}
        if step in KEPT_STEPS:
            kept[step] = policy.copy_weights(model)
    figures = {
        "step_s": round((time.perf_counter() - t0) / max(steps, 1), 2),
        "sequences_per_step": len(_texts(0)),
        "completion_tokens_per_step": round(tokens / max(steps, 1), 1),
        "last_step": {k: round(v, 5) for k, v in last.items()},
    }
    return kept, figures


def load_or_train(
    model_dir: Path, snapshots: Path | None, lr: float
) -> tuple[dict[int, dict[str, torch.Tensor]], dict]:
    """The kept fp32 weights: from `snapshots` when it holds them, else trained (and saved).
    The default lr's snapshots are in `snapshots` itself, another lr's in `snapshots/lr<lr>`."""
    from safetensors.torch import load_file, save_file

    if snapshots is not None and lr != default_lr():
        snapshots = snapshots / f"lr{lr:g}"
    files = {s: snapshots / f"step{s:02d}.safetensors" for s in KEPT_STEPS} if snapshots else {}
    if files and all(f.is_file() for f in files.values()):
        info = json.loads((snapshots / "train.json").read_text()) if (snapshots / "train.json").is_file() else {}
        return {s: load_file(f) for s, f in files.items()}, {**info, "reused_snapshots": str(snapshots)}
    kept, figures = train(model_dir, max(KEPT_STEPS), lr)
    if snapshots:
        snapshots.mkdir(parents=True, exist_ok=True)
        for s, f in files.items():
            save_file({k: v.contiguous() for k, v in kept[s].items()}, str(f))
        (snapshots / "train.json").write_text(json.dumps(figures))
    return kept, figures


def _changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per element: do the bits of `a` and `b` differ?"""
    n = b.numel()
    return (a.reshape(-1).view(torch.uint8).reshape(n, -1) != b.reshape(-1).view(torch.uint8).reshape(n, -1)).any(1)


def _h(p: np.ndarray) -> np.ndarray:
    """Binary entropy in bits (0 at p = 0 or 1)."""
    p = np.clip(p, 1e-300, 1.0)
    q = np.clip(1.0 - p, 1e-300, 1.0)
    return np.where((p <= 1e-300) | (q <= 1e-300), 0.0, -(p * np.log2(p) + q * np.log2(q)))


def entropy_bits(old: torch.Tensor, new: torch.Tensor) -> dict[str, float]:
    """An empirical (order-0) entropy of the change, in bits, for one tensor, under the
    codec's own model: which elements changed, as independent coin flips per exponent
    of the base value (the codec's visiting order), plus the changed elements' integer
    differences `new - old` of the bits (mod 2**bits), i.i.d. within each exponent class
    from their empirical distribution there. No lossless coder of that model does better
    on average; a coder that uses more context (runs, neighbours, the gradient) can."""
    n = new.numel()
    itemsize = new.element_size()
    u = {2: np.uint16, 4: np.uint32, 8: np.uint64}.get(itemsize)
    if u is None or n == 0:
        return {"positions": 0.0, "values": 0.0}
    a = old.reshape(-1).view({2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize]).numpy().view(u)
    b = new.reshape(-1).view({2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize]).numpy().view(u)
    changed = a != b
    k = int(changed.sum())
    if k == 0:
        return {"positions": 0.0, "values": 0.0}
    mbits = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}.get(new.dtype)
    if mbits is None:
        cls = np.zeros(n, dtype=np.int64)
    else:
        cls = ((a >> u(mbits)) & u((1 << (8 * itemsize - 1 - mbits)) - 1)).astype(np.int64)
    tot = np.bincount(cls)
    hit = np.bincount(cls[changed], minlength=len(tot))
    live = tot > 0
    positions = float((tot[live] * _h(hit[live] / tot[live])).sum())
    # the differences, i.i.d. within each exponent class (the codec visits them so)
    d = (b[changed] - a[changed]).astype(np.uint64)
    c = cls[changed].astype(np.uint64)
    key = (c << np.uint64(8 * itemsize)) | d if itemsize <= 4 else d  # (class, difference) pairs
    keys, joint = np.unique(key, return_counts=True)
    of = (keys >> np.uint64(8 * itemsize)).astype(np.int64) if itemsize <= 4 else np.zeros(keys.size, np.int64)
    n_class = np.bincount(of, weights=joint)[of]
    values = float(-(joint * np.log2(joint / n_class)).sum())
    return {"positions": positions, "values": values}


def measure(
    old: dict[str, torch.Tensor], new: dict[str, torch.Tensor], codec: str, decode_threads: int = 1
) -> dict[str, object]:
    """Size, modes, changed fraction, throughput and bit-exactness of one delta."""
    full = sum(t.numel() * t.element_size() for t in new.values())
    numel = sum(t.numel() for t in new.values())
    changed = sum(int(_changed(old[k], t).sum()) for k, t in new.items())
    t0, c0 = time.perf_counter(), time.process_time()
    blob = deltacodec.encode(old, new, codec=codec)
    enc_s, enc_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    out = deltacodec.apply(old, blob, threads=decode_threads)
    dec_s, dec_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    ent = [entropy_bits(old[k], t) for k, t in new.items() if k in old and old[k].dtype == t.dtype]
    pos_bits = sum(e["positions"] for e in ent)
    val_bits = sum(e["values"] for e in ent)
    bound = (pos_bits + val_bits) / 8
    modes: dict[str, int] = {}
    for e in deltacodec.read_header(blob)["tensors"]:
        modes[e["mode"]] = modes.get(e["mode"], 0) + 1
    return {
        "full_bytes": full,
        "delta_bytes": len(blob),
        "ratio": round(full / len(blob), 2),
        "entropy_bound_ratio": round(full / max(bound, 1.0), 2),
        "entropy_bytes": {"positions": round(pos_bits / 8), "values": round(val_bits / 8)},
        "delta_vs_entropy": round(len(blob) / max(bound, 1.0), 3),
        "changed_fraction": round(changed / max(numel, 1), 5),
        "modes": modes,
        "encode_GBps": round(full / enc_s / 1e9, 3),
        "decode_GBps": round(full / dec_s / 1e9, 3),
        "encode_cpu_s": round(enc_cpu_s, 3),
        "decode_cpu_s": round(dec_cpu_s, 3),
        "decode_cpu_GBps": round(full / dec_cpu_s / 1e9, 3),
        "bit_exact": deltacodec.same_bits(out, new),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=ROOT / ".rlfeed" / "models" / "smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--decode-threads", type=int, default=1, help="tensors `delta.apply` decodes at once (its `threads`)"
    )
    ap.add_argument("--codec", default=deltacodec.default_codec())
    ap.add_argument("--snapshots", type=Path, default=None)
    ap.add_argument(
        "--small-lr",
        type=float,
        default=1e-6,
        help="also measure deltas of a run at this learning rate, reported apart (0: skip)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if not (args.model_dir / "config.json").is_file():
        from services.localmodel.build import build

        build(args.model_dir, "full")
    lr = default_lr()
    c0 = time.process_time()
    deltacodec.warm_up()
    warmup_cpu_s = time.process_time() - c0
    t0 = time.perf_counter()
    kept, figures = load_or_train(args.model_dir, args.snapshots, lr)
    train_s = time.perf_counter() - t0
    n_params = sum(t.numel() for t in kept[0].values())
    results = measure_all(kept, args.codec, args.decode_threads)
    del kept
    small: dict[str, object] = {}
    if args.small_lr > 0:
        kept_small, figures_small = load_or_train(args.model_dir, args.snapshots, args.small_lr)
        small = {
            "results_small_lr": {
                "note": f"NOT the headline: the same run at lr {args.small_lr:g} (typical of RL fine-tuning "
                f"of LLMs) instead of the trainer's default {lr:g}",
                "lr": args.small_lr,
                "training": figures_small,
                "results": measure_all(kept_small, args.codec, args.decode_threads),
            }
        }
        del kept_small
    bf16 = results["bfloat16"]
    out = {
        "bench": "delta",
        "model_dir": str(args.model_dir),
        "parameters": n_params,
        "optimizer": {"name": "AdamW", "lr": lr, "betas": [0.9, 0.99], "weight_decay": 0.0, "grad_clip_norm": 1.0},
        "loss": "services.trainer.losses.total_loss (policy gradient, truncated IS, kl_coef 0)",
        "training": figures,
        "train_s": round(train_s, 1),
        "codec": args.codec,
        "torch_threads": args.threads,
        "decode_threads": args.decode_threads,
        "numba_kernels": deltacodec._kernels() is not None,
        "codec_warmup_cpu_s": round(warmup_cpu_s, 3),
        "cpu_count": os.cpu_count(),
        "results": results,
        "targets": {
            "lr": lr,
            "bf16_1_step_ratio_ge_50": bool(bf16["1_step"]["ratio"] >= 50),
            "bf16_10_steps_ratio_ge_20": bool(bf16["10_steps"]["ratio"] >= 20),
            "all_bit_exact": all(r["bit_exact"] for d in results.values() for r in d.values()),
        },
        **small,
    }
    print(json.dumps(out))


def measure_all(
    kept: dict[int, dict[str, torch.Tensor]], codec: str, decode_threads: int = 1
) -> dict[str, dict[str, object]]:
    """`measure` of every pair in PAIRS, per dtype (bf16, fp32)."""
    results: dict[str, dict[str, object]] = {}
    for dtype in (torch.bfloat16, torch.float32):
        cast = {s: {k: v.to(dtype) for k, v in w.items()} for s, w in kept.items()}
        results[str(dtype).removeprefix("torch.")] = {
            label: measure(cast[a], cast[b], codec, decode_threads) for label, (a, b) in PAIRS.items()
        }
        del cast
    return results


if __name__ == "__main__":
    main()

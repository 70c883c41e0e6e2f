"""The eval gate: a candidate version ships only if its figures stay within bounds.

Figures, from the held-out samples (never trained on) and fresh generations on their
prompts by the candidate and by its parent (the latest published version):

| figure | how |
|---|---|
| heldout_reward | mean reward of the held-out samples (what their samplers earned) |
| reward_estimate, reward_se | the candidate's reward on them by self-normalised importance weights (below); its error |
| kl_parent | per-token k3 KL(candidate || parent) on the candidate's own generations |
| mean_tokens, empty_frac, truncated_frac | lengths of the candidate's generations (EOS excluded) |
| parent_mean_tokens, parent_empty_frac, parent_truncated_frac | the same for the parent, same prompts |
| length_ratio | mean_tokens / parent_mean_tokens (held-out completions when no parent sample) |
| distinct_frac, distinct2 | distinct completions per prompt; distinct / all token bigrams |

reward_estimate = sum_i w_i r_i / sum_i w_i with
w_i = min(exp(mean_t(logp_cand - logp_sampler)), truncate_ratio_max): a per-token
(geometric-mean) ratio, biased but with bounded variance, like the trainer's truncated IS.
reward_se = std(r) * sqrt(sum w_i^2) / sum w_i (the usual effective-sample-size form).
The reward bound is `heldout_reward - max(gate_reward_drop_max, gate_reward_drop_se * reward_se)`,
so a handful of held-out samples cannot refuse a version on noise alone.

Length bounds are relative to the parent: a model whose answers already run to the
token limit is not refused for keeping them, but a jump (more empty or truncated answers
than the parent by more than `gate_max_rise_frac`, or answers shrinking below
`gate_min_length_ratio` of the parent's) is a degenerate policy and is refused. The
absolute bounds (`gate_max_empty_frac`, `gate_max_truncated_frac`, `gate_min_mean_tokens`,
distinctness) hold whatever the parent did.

When held-out samples carry a reward-model score (streams' `reward_model` component), the
reward-model guard (services/preferences/guard.py) also refuses a version whose held-out
samples show the score and the users' verdict diverging (rm_user_auroc).

`judge` is pure: figures and bounds in, the list of broken bounds out (empty: ship).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from schemas.events import SampleEvent
from services.preferences.guard import judge_samples
from services.trainer import losses, policy
from services.trainer.batching import Collated, collate
from services.trainer.settings import TrainerSettings

GenerateFn = Callable[[list[list[int]]], list[list[int]]]
"""prompt token ids -> completion token ids (EOS and padding removed)."""


@dataclass(frozen=True)
class GateResult:
    figures: dict[str, float]
    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures


def generation_figures(completions: Sequence[Sequence[int]], max_new_tokens: int) -> dict[str, float]:
    """Length and diversity figures of the gate's generations (one per prompt)."""
    n = max(len(completions), 1)
    lengths = [len(c) for c in completions]
    bigrams = [(c[i], c[i + 1]) for c in completions for i in range(len(c) - 1)]
    return {
        "mean_tokens": sum(lengths) / n,
        "empty_frac": sum(1 for x in lengths if x == 0) / n,
        "truncated_frac": sum(1 for x in lengths if x >= max_new_tokens) / n,
        "distinct_frac": len({tuple(c) for c in completions}) / n,
        "distinct2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
    }


def judge(figures: dict[str, float], s: TrainerSettings) -> list[str]:
    """The bounds a candidate's figures break (empty: it may ship)."""
    failures = []
    if figures.get("heldout_samples", 0) < s.gate_min_heldout:
        failures.append(f"heldout_samples {figures.get('heldout_samples', 0):.0f} < {s.gate_min_heldout}")
    if "reward_estimate" in figures:
        drop = max(s.gate_reward_drop_max, s.gate_reward_drop_se * figures.get("reward_se", 0.0))
        if figures["reward_estimate"] < figures["heldout_reward"] - drop:
            failures.append(
                f"reward_estimate {figures['reward_estimate']:.4f} < heldout_reward {figures['heldout_reward']:.4f}"
                f" - {drop:.4f}"
            )
    if figures.get("kl_parent", 0.0) > s.gate_kl_parent_max:
        failures.append(f"kl_parent {figures['kl_parent']:.4f} > {s.gate_kl_parent_max}")
    checks = [
        ("mean_tokens", "<", s.gate_min_mean_tokens),
        ("length_ratio", "<", s.gate_min_length_ratio),
        ("empty_frac", ">", _rise_bound(figures, "empty_frac", s.gate_max_empty_frac, s)),
        ("truncated_frac", ">", _rise_bound(figures, "truncated_frac", s.gate_max_truncated_frac, s)),
        ("distinct_frac", "<", s.gate_min_distinct_frac),
        ("distinct2", "<", s.gate_min_distinct2),
    ]
    for name, op, bound in checks:
        if name not in figures:
            continue
        value = figures[name]
        if (op == "<" and value < bound) or (op == ">" and value > bound):
            failures.append(f"{name} {value:.4f} {op} {bound:g}")
    return failures


def _rise_bound(figures: dict[str, float], name: str, absolute: float, s: TrainerSettings) -> float:
    """Upper bound of a fraction: the absolute bound, or the parent's fraction plus the
    allowed rise when the parent was already above it."""
    parent = figures.get(f"parent_{name}")
    return absolute if parent is None else max(absolute, min(parent + s.gate_max_rise_frac, 1.0))


def sampler(model: torch.nn.Module, eos_ids: set[int], pad: int, s: TrainerSettings) -> GenerateFn:
    """A GenerateFn sampling from `model` (left-padded batch, temperature from settings)."""

    def generate(prompts: list[list[int]]) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            attn[i, width - len(p) :] = 1
        dev = policy.device_of(model)
        out = model.generate(
            input_ids=ids.to(dev),
            attention_mask=attn.to(dev),
            do_sample=True,
            temperature=s.gate_temperature,
            top_p=1.0,
            top_k=0,
            max_new_tokens=s.gate_max_new_tokens,
            pad_token_id=pad,
        )[:, width:].tolist()
        completions = []
        for row in out:
            cut = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
            completions.append(row[:cut])
        return completions

    return generate


@torch.no_grad()
def evaluate(
    candidate: torch.nn.Module,
    parent: torch.nn.Module,
    heldout: Sequence[SampleEvent],
    s: TrainerSettings,
    *,
    pad_id: int,
    generate: GenerateFn,
    generate_parent: GenerateFn | None = None,
) -> GateResult:
    """Measure a candidate against its parent on the held-out samples and judge it.

    `generate` samples from the candidate; `generate_parent`, from the parent (None: the
    length bounds are absolute only and length_ratio is against the held-out completions).
    """
    was_training = candidate.training
    candidate.eval()
    try:
        figures: dict[str, float] = {"heldout_samples": float(len(heldout))}
        if not heldout:
            return GateResult(figures, judge(figures, s))
        rewards = torch.tensor([x.reward for x in heldout])
        figures["heldout_reward"] = float(rewards.mean())
        col = collate(list(heldout), s.max_seq_tokens, pad_id)
        logp = policy.token_logprobs(candidate, col.input_ids, col.attention_mask, col.completion_mask)
        n_tok = col.completion_mask.sum(dim=1).clamp(min=1)
        mean_log_ratio = ((logp - col.sampler_logp) * col.completion_mask).sum(dim=1) / n_tok
        w = torch.exp(mean_log_ratio).clamp(max=s.truncate_ratio_max)
        w_sum = w.sum().clamp(min=1e-12)
        figures["reward_estimate"] = float((w * rewards).sum() / w_sum)
        r_std = float(rewards.std()) if len(heldout) > 1 else 0.0
        figures["reward_se"] = r_std * float(w.pow(2).sum().sqrt() / w_sum)
        figures["heldout_mean_tokens"] = float(col.completion_mask.sum(dim=1).mean())

        prompts: list[list[int]] = []
        for x in reversed(heldout):  # newest first
            p = list(x.prompt_token_ids)
            if p not in prompts:
                prompts.append(p)
            if len(prompts) >= s.gate_prompts:
                break
        completions = generate(prompts)
        figures.update(generation_figures(completions, s.gate_max_new_tokens))
        length_base = figures["heldout_mean_tokens"]
        if generate_parent is not None:
            parent_figures = generation_figures(generate_parent(prompts), s.gate_max_new_tokens)
            for name in ("mean_tokens", "empty_frac", "truncated_frac"):
                figures[f"parent_{name}"] = parent_figures[name]
            length_base = parent_figures["mean_tokens"]
        figures["length_ratio"] = figures["mean_tokens"] / max(length_base, 1e-9)
        nonempty = [(p, c) for p, c in zip(prompts, completions, strict=True) if c]
        if nonempty:
            gen = collate_generations(nonempty, pad_id)
            lc = policy.token_logprobs(candidate, gen.input_ids, gen.attention_mask, gen.completion_mask)
            lp = policy.token_logprobs(parent, gen.input_ids, gen.attention_mask, gen.completion_mask)
            kl = losses.kl_to_reference(lc, lp, gen.completion_mask).sum() / gen.completion_mask.sum()
            figures["kl_parent"] = float(kl)
        else:
            figures["kl_parent"] = 0.0
        # Reward hacking against the reward model: its scores must still agree with users.
        rm = judge_samples(heldout, min_auroc=s.gate_rm_min_user_auroc, min_samples=s.gate_rm_min_samples)
        figures.update(rm.figures)
        return GateResult(figures, judge(figures, s) + rm.failures)
    finally:
        candidate.train(was_training)


def collate_generations(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> Collated:
    """Collated tensors of (prompt, completion) pairs, for logprobs of the completions."""
    length = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    mask = torch.zeros((len(pairs), length - 1))
    for i, (p, c) in enumerate(pairs):
        seq = p + c
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        mask[i, len(p) - 1 : len(seq) - 1] = 1.0
    return Collated(ids, attn, mask, torch.zeros_like(mask))

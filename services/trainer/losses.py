"""The trainer's maths as small pure functions (tensors in, tensors out).

Per completion token t of sample i, with the trainer's logprob `logp`, the sampler's
`logp_s` and the frozen reference's `logp_ref`:

    rho      = exp(logp - logp_s)                 importance ratio (staleness + numerics)
    w        = min(rho, truncate_ratio_max)       truncated importance weight, no gradient
    pg       = -w * A_i * logp                    REINFORCE with truncated IS
    kl       = exp(logp_ref - logp) - (logp_ref - logp) - 1     k3 estimator of KL(pi||ref)
    loss     = sum_t mask * (pg + kl_coef * kl) / sum_t mask    token-level mean

Advantages: samples that share a prompt (a group of two or more in the batch) get
`reward - group mean` (GRPO without the std division); a sample alone with its prompt gets
`reward - running baseline`, where the baseline is an exponential moving average of the
rewards seen so far (`baseline_decay` per sample).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence

import torch


def advantages(
    rewards: Sequence[float], groups: Sequence[Hashable], baseline: float | None, baseline_decay: float
) -> tuple[list[float], float | None]:
    """Advantages of one batch and the updated running baseline.

    `baseline` None means no reward seen yet: a lone sample then gets advantage 0 (its
    reward only seeds the baseline). The baseline moves over every reward of the batch, in
    order, after the advantages are computed, so a sample never baselines itself."""
    members: dict[Hashable, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    out = [0.0] * len(rewards)
    for idx in members.values():
        if len(idx) >= 2:
            mean = sum(rewards[i] for i in idx) / len(idx)
            for i in idx:
                out[i] = rewards[i] - mean
        else:
            i = idx[0]
            out[i] = 0.0 if baseline is None else rewards[i] - baseline
    for r in rewards:
        baseline = r if baseline is None else baseline_decay * baseline + (1.0 - baseline_decay) * r
    return out, baseline


def truncated_importance_weights(logp: torch.Tensor, logp_sampler: torch.Tensor, ratio_max: float) -> torch.Tensor:
    """min(exp(logp - logp_sampler), ratio_max), detached: the per-token TIS weight."""
    return torch.exp(logp.detach() - logp_sampler).clamp(max=ratio_max)


def policy_gradient_loss(
    logp: torch.Tensor, logp_sampler: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, ratio_max: float
) -> torch.Tensor:
    """Per-token loss -w * A * logp (shape of `logp`); `adv` is per sample (B,) and is
    broadcast over the tokens; masked tokens give 0."""
    w = truncated_importance_weights(logp, logp_sampler, ratio_max)
    return -(w * adv[:, None] * logp) * mask


def kl_to_reference(logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference), >= 0; masked tokens give 0."""
    d = logp_ref - logp
    return (torch.exp(d) - d - 1.0) * mask


def total_loss(
    logp: torch.Tensor,
    logp_sampler: torch.Tensor,
    logp_ref: torch.Tensor | None,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    ratio_max: float,
    n_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The scalar loss (token-level mean over `n_tokens`, default the mask's sum) and
    figures to log: pg, kl, the mean and max importance ratio, the truncated fraction."""
    n = float(n_tokens if n_tokens is not None else mask.sum().item())
    n = max(n, 1.0)
    pg = policy_gradient_loss(logp, logp_sampler, adv, mask, ratio_max).sum() / n
    loss = pg
    kl_val = 0.0
    if logp_ref is not None and kl_coef:
        kl = kl_to_reference(logp, logp_ref, mask).sum() / n
        loss = loss + kl_coef * kl
        kl_val = float(kl.detach())
    with torch.no_grad():
        rho = torch.exp(logp.detach() - logp_sampler)
        m = mask.bool()
        sel = rho[m] if m.any() else torch.ones(1)
        stats = {
            "pg_loss": float(pg.detach()),
            "kl_ref": kl_val,
            "ratio_mean": float(sel.mean()),
            "ratio_max": float(sel.max()),
            "truncated_frac": float((sel > ratio_max).float().mean()),
        }
    return loss, stats

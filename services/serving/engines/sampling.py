"""One decoding step's sampling and logprob extraction (torch, no model).

The logprob of a sampled token is taken under the distribution it was actually sampled
from: logits divided by the temperature, restricted to the top-p nucleus and
renormalised (vLLM's `logprobs_mode="processed_logprobs"`). Greedy rows (temperature 0)
report the model's plain log-softmax, the logprob at temperature 1. The event carries the
sampling parameters, so the trainer can tell which it got.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MIN_LOGPROB = -1e4
"""Floor for reported logprobs (the event contract's bound); -inf (outside the nucleus) maps here."""


def processed_logprobs(logits: torch.Tensor, temperature: Sequence[float], top_p: Sequence[float]) -> torch.Tensor:
    """Log-probabilities [B, V] of the per-row sampling distributions."""
    logits = logits.float()
    t = torch.tensor([x if x > 0 else 1.0 for x in temperature], dtype=logits.dtype, device=logits.device)
    scaled = logits / t[:, None]
    p = torch.tensor(list(top_p), dtype=logits.dtype, device=logits.device)
    if bool((p < 1.0).any()):
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Keep a token while the mass before it is below top_p (the first token always stays).
        before = probs.cumsum(dim=-1) - probs
        drop_sorted = before >= p[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled.log_softmax(dim=-1)


def sample(
    logprobs: torch.Tensor, temperature: Sequence[float], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """One token per row: argmax where temperature is 0, else a draw from the row's own generator.

    Draws by inverting the CDF with one uniform number per row (`torch.multinomial` is
    ~100x slower over a 50k vocabulary on CPU); `right` search never lands on a
    zero-probability token.
    """
    greedy = logprobs.argmax(dim=-1).tolist()
    rows = [i for i, t in enumerate(temperature) if t > 0]
    out = [int(g) for g in greedy]
    if rows:
        cdf = logprobs[rows].exp().cumsum(dim=-1)
        u = torch.stack([torch.rand((), generator=generators[i], dtype=cdf.dtype) for i in rows]) * cdf[:, -1]
        picked = torch.searchsorted(cdf, u[:, None], right=True)[:, 0].clamp(max=cdf.shape[-1] - 1)
        for i, tok in zip(rows, picked.tolist(), strict=True):
            out[i] = int(tok)
    return out


def gather_logprobs(logprobs: torch.Tensor, token_ids: Sequence[int]) -> list[float]:
    """The logprob of each row's sampled token, clamped to the contract's range."""
    idx = torch.tensor(list(token_ids), device=logprobs.device)[:, None]
    picked = logprobs.gather(-1, idx)[:, 0].clamp(min=MIN_LOGPROB, max=0.0)
    return [float(x) for x in picked.tolist()]


def top_logprobs(logprobs: torch.Tensor, n: int) -> list[list[tuple[int, float]]]:
    """The `n` most likely tokens of each row with their logprobs (for the API's `top_logprobs`)."""
    if n <= 0:
        return [[] for _ in range(logprobs.shape[0])]
    values, ids = logprobs.topk(n, dim=-1)
    values = values.clamp(min=MIN_LOGPROB, max=0.0)
    return [list(zip(r_ids, r_vals, strict=True)) for r_ids, r_vals in zip(ids.tolist(), values.tolist(), strict=True)]


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one request: seeded when the request asks, random otherwise."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed % (2**63))
    return g

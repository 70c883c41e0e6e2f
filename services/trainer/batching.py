"""Pure batch building: which samples train, and their padded tensors.

A batch is what one step consumes from samples.v1: the samples that train, the ones held
out for the eval gate, counts of the ones dropped, and the consumed offset ranges, so the
step can record exactly which messages it covered.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from schemas.events import SampleEvent


@dataclass
class Collated:
    """Right-padded tensors of a list of samples.

    Position j of the (B, L-1) tensors is about token j+1 of the sequence, which the
    model predicts from the logits at position j."""

    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long
    completion_mask: torch.Tensor  # (B, L-1) float, 1 on completion tokens
    sampler_logp: torch.Tensor  # (B, L-1) float, the sampler's logprob on completion tokens
    ref_logp: torch.Tensor | None = None
    """(B, L-1) float: the frozen reference's logprobs, computed ahead by the pipeline
    stage (rows where `ref_ready` is False hold zeros and are computed at the step)."""
    ref_ready: torch.Tensor | None = None
    """(B,) bool: rows of `ref_logp` that were computed."""

    def rows(self, idx: list[int]) -> Collated:
        """The given rows, with padding columns no row needs trimmed off."""
        ix = torch.tensor(idx, dtype=torch.long)
        attn = self.attention_mask[ix]
        length = max(int(attn.sum(dim=1).max()), 2) if len(idx) else 2
        return Collated(
            self.input_ids[ix, :length],
            attn[:, :length],
            self.completion_mask[ix, : length - 1],
            self.sampler_logp[ix, : length - 1],
            None if self.ref_logp is None else self.ref_logp[ix, : length - 1],
            None if self.ref_ready is None else self.ref_ready[ix],
        )

    def has_reference(self) -> bool:
        """Whether every row's reference logprobs are already here."""
        return self.ref_ready is not None and self.ref_logp is not None and bool(self.ref_ready.all())

    def to(self, device: torch.device) -> Collated:
        """The same tensors on `device` (itself when they are there already)."""
        if self.input_ids.device == device:
            return self
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Collated(
            move(self.input_ids),
            move(self.attention_mask),
            move(self.completion_mask),
            move(self.sampler_logp),
            move(self.ref_logp),
            move(self.ref_ready),
        )

    @property
    def n_tokens(self) -> int:
        return int(self.completion_mask.sum())


@dataclass
class Batch:
    """One step's worth of consumed messages."""

    samples: list[SampleEvent] = field(default_factory=list)
    """Samples to train on (right model, fresh enough, not held out)."""
    heldout: list[SampleEvent] = field(default_factory=list)
    """Samples kept out of training for the eval gate."""
    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)
    """Partition -> [first, next) offsets consumed by this batch."""
    offsets_after: dict[int, int] = field(default_factory=dict)
    """Next offset to read per partition once this batch is done (every partition seen)."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Reason -> count of messages skipped (stale, other_model, invalid, empty)."""
    collated: Collated | None = None
    """Tensors of `samples`, built off the optimiser's thread."""
    messages: int = 0
    """Messages consumed (every kind)."""

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n


def is_heldout(generation_id: str, every: int) -> bool:
    """Whether a sample belongs to the gate's held-out set (stable across restarts)."""
    digest = hashlib.blake2b(generation_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % every == 0


def prompt_key(sample: SampleEvent) -> bytes:
    """The group a sample belongs to for group-relative advantages: its prompt tokens."""
    return hashlib.blake2b(repr(sample.prompt_token_ids).encode(), digest_size=16).digest()


def may_train(rewards: list[float], groups: list[bytes]) -> list[bool]:
    """Per sample: can it get a nonzero advantage? False only for a member of a group of
    two or more whose rewards are all equal (group-relative advantage 0 whatever the
    baseline); the pipeline skips the reference's forward for those rows."""
    members: dict[bytes, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    out = [True] * len(rewards)
    for idx in members.values():
        if len(idx) >= 2 and len({rewards[i] for i in idx}) == 1:
            for i in idx:
                out[i] = False
    return out


def shortest_first(lengths: list[int]) -> list[int]:
    """Indices of `lengths` from the shortest to the longest (stable): micro-batches cut
    from that order pad each row to a length close to its own."""
    return sorted(range(len(lengths)), key=lengths.__getitem__)


def too_stale(policy_version: int, current_version: int, max_staleness_versions: int) -> bool:
    """A sample sampled more than `max_staleness_versions` behind the latest version."""
    return current_version - policy_version > max_staleness_versions


def collate(samples: list[SampleEvent], max_seq_tokens: int, pad_id: int) -> Collated:
    """Pad prompt + completion to one length; a sequence longer than `max_seq_tokens`
    loses the tail of its completion (the prompt is kept whole if it fits)."""
    seqs, comp_starts = [], []
    for s in samples:
        prompt = list(s.prompt_token_ids)[-(max_seq_tokens - 1) :]
        room = max_seq_tokens - len(prompt)
        seqs.append((prompt + list(s.completion_token_ids)[:room], list(s.completion_logprobs)[:room]))
        comp_starts.append(len(prompt))
    length = max(2, max((len(ids) for ids, _ in seqs), default=2))
    b = len(samples)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    attn = torch.zeros((b, length), dtype=torch.long)
    mask = torch.zeros((b, length - 1), dtype=torch.float32)
    slogp = torch.zeros((b, length - 1), dtype=torch.float32)
    for i, ((ids, lps), start) in enumerate(zip(seqs, comp_starts, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attn[i, : len(ids)] = 1
        n = len(lps)
        if n and start >= 1:
            mask[i, start - 1 : start - 1 + n] = 1.0
            slogp[i, start - 1 : start - 1 + n] = torch.tensor(lps, dtype=torch.float32)
    return Collated(input_ids, attn, mask, slogp)

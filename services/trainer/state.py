"""The trainer's resumable checkpoint: weights, optimiser, consumed offsets, together.

One checkpoint is one folder `step-<step>-<write time ns>` under `<trainer_state_dir>/<model>/`:
`model.safetensors` (policy weights), `optimizer.pt` (AdamW state), `meta.json` (step,
offsets per partition of samples.v1, latest published version, baseline, counters, the
gate's held-out samples). Writing order:
1. the step that consumed the offsets has finished (weights and optimiser reflect it);
2. every file goes into a fresh `.tmp-*` folder and is fsynced;
3. the folder is renamed to `step-<step>-<ns>` (atomic), then the parent folder is fsynced;
4. older checkpoints beyond `checkpoints_kept` are deleted.
A folder named `step-*` is therefore always complete; a crash leaves at most a `.tmp-*`
folder, which the next start removes. Restarting from `step-N` re-reads samples.v1 from
its offsets: the steps after it are redone (their weights were lost with the process),
nothing is skipped and nothing is trained twice into the surviving weights.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

import orjson
import torch
from safetensors.torch import load_file, save_file


@dataclass
class TrainerMeta:
    """Everything in a checkpoint besides the tensors."""

    step: int = 0
    """Batches consumed (each is one step; a step without trainable samples skips the optimiser)."""
    optimizer_steps: int = 0
    topic: str = ""
    """The samples topic the offsets belong to (a different prefix invalidates them)."""
    offsets: dict[int, int] = field(default_factory=dict)
    """Next offset to read, per partition of `topic`."""
    published_version: int = 0
    """The version the weights build on (their parent): the latest one this trainer
    published, or the one it reloaded when following a rollback."""
    lineage_since_ms: int = 0
    """When the trainer adopted `published_version` (ms since the epoch): rollbacks
    older than this are history (services.trainer.lineage)."""
    baseline: float | None = None
    samples_trained: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    """Dropped messages by reason, held-out samples, gate refusals, ..."""
    heldout: list[dict] = field(default_factory=list)
    """The gate's held-out samples (JSON objects), newest last."""
    steps_since_publish: int = 0
    samples_since_publish: int = 0
    written_at: float = 0.0

    def to_json(self) -> bytes:
        d = asdict(self)
        d["offsets"] = {str(k): v for k, v in self.offsets.items()}
        return orjson.dumps(d)

    @classmethod
    def from_json(cls, raw: bytes) -> TrainerMeta:
        d = orjson.loads(raw)
        d["offsets"] = {int(k): int(v) for k, v in d.get("offsets", {}).items()}
        return cls(**d)


def model_state_dir(root: Path, model: str) -> Path:
    """The folder holding one model's checkpoints and step ledger."""
    return Path(root) / quote(model, safe="")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(folder: Path, meta: TrainerMeta, weights: dict[str, torch.Tensor], optimizer: dict, keep: int) -> Path:
    """Write a checkpoint atomically (see the module docstring) and return its folder."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
    torch.save(optimizer, tmp / "optimizer.pt")
    (tmp / "meta.json").write_bytes(meta.to_json())
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    # The write time in the name: the same step may be saved again (after a publish, at
    # shutdown), and a rename never replaces an existing checkpoint.
    final = folder / f"step-{meta.step:012d}-{time.time_ns():020d}"
    os.rename(tmp, final)
    _fsync(folder)
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_leftovers(folder: Path) -> None:
    """Delete `.tmp-*` folders of interrupted writes (only the trainer that owns the
    folder may call this, at start)."""
    for tmp in folder.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def latest(folder: Path) -> Path | None:
    """The newest complete checkpoint folder (read-only: safe while a trainer writes)."""
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.glob("step-*") if (p / "meta.json").is_file())
    return done[-1] if done else None


def load(path: Path) -> tuple[TrainerMeta, dict[str, torch.Tensor], dict]:
    """meta, weights and optimiser state of a checkpoint folder."""
    meta = TrainerMeta.from_json((path / "meta.json").read_bytes())
    weights = load_file(str(path / "model.safetensors"))
    optimizer = torch.load(path / "optimizer.pt", weights_only=True)
    return meta, weights, optimizer

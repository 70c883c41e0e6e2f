"""The one settings model of `rlfeed rewardmodel` (`RLFEED_` environment variables)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.config import RlfeedSettings, StoreLocation


class RewardModelSettings(RlfeedSettings):
    """`rlfeed rewardmodel train|serve`: retrain from preferences.v1, publish, score."""

    reward_model_name: str = "rewardmodel-minilm"
    """Name of the reward model (key of model-updates.v1, folder in the checkpoint store)."""
    checkpoint_dir: StoreLocation | None = None
    """Root of the checkpoint store (the same setting as the trainer's): a directory or an
    fsspec URL (`s3://bucket/prefix`); unset: `<home_dir>/checkpoints`."""

    # --- data ---
    rm_max_preferences: int = Field(50_000, ge=10)
    """Preferences kept in memory for retraining (the newest; older ones are forgotten)."""
    rm_heldout_pct: int = Field(20, ge=1, le=50)
    """Share (percent) of prompts held out for evaluation (by a hash of the prompt, so a
    held-out prompt is never trained on)."""
    rm_max_seq_tokens: int = Field(128, ge=16, le=512)
    """Prompt + completion tokens the backbone sees (the prompt is cut first)."""

    # --- cadence and training ---
    rm_train_interval_s: float = Field(300.0, gt=0)
    """Retrain at most this often."""
    rm_min_new_preferences: int = Field(50, ge=1)
    """Retrain only when this many preferences arrived since the last training."""
    rm_min_train_pairs: int = Field(50, ge=1)
    """Train only with at least this many training pairs."""
    rm_finetune_layers: int = Field(0, ge=0, le=6)
    """Top MiniLM layers fine-tuned with the head (0: frozen backbone, cached embeddings;
    bench/rewardmodel.py measures the trade-off)."""
    rm_epochs: int = Field(40, ge=1)
    """Passes over the training preferences per retraining."""
    rm_lr: float = Field(1e-2, gt=0)
    """AdamW learning rate of the head."""
    rm_batch_size: int = Field(64, ge=1)
    """Pairs per optimiser step (and texts per embedding batch)."""
    rm_torch_threads: int = Field(1, ge=1)
    """torch intra-op threads (the process shares the cores with the others)."""

    # --- publishing gate ---
    rm_min_heldout_pairs: int = Field(20, ge=1)
    """A version is published only when evaluated on at least this many held-out pairs."""
    rm_min_heldout_auroc: float = Field(0.55, ge=0.5, le=1.0)
    """...and when its held-out pairwise AUROC reaches this."""

    # --- serving ---
    rm_serve_host: str = "127.0.0.1"
    """Address `rlfeed rewardmodel serve` listens on."""
    rm_serve_port: int = Field(8090, ge=0, le=65535)
    """Port of `rlfeed rewardmodel serve`."""
    rm_serve_max_items: int = Field(256, ge=1)
    """Most (prompt, completion) items one scoring request may carry."""

    @property
    def store_dir(self) -> str | Path:
        """The checkpoint store root (a directory or an fsspec URL)."""
        return self.checkpoint_dir or self.home_dir / "checkpoints"

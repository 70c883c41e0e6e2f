"""The loss functions against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from services.trainer import losses


def test_group_relative_and_running_baseline_advantages() -> None:
    # Prompt "a" has three samples (mean 0.5), "b" two (mean 0), "c" is alone.
    rewards = [1.0, 0.0, 0.5, 1.0, -1.0, 0.8]
    groups = ["a", "a", "a", "b", "b", "c"]
    adv, baseline = losses.advantages(rewards, groups, baseline=0.2, baseline_decay=0.5)
    assert adv == pytest.approx([0.5, -0.5, 0.0, 1.0, -1.0, 0.6])
    # EMA over the rewards in order: 0.2 -> 0.6 -> 0.3 -> 0.4 -> 0.7 -> -0.15 -> 0.325
    assert baseline == pytest.approx(0.325)


def test_lone_sample_without_baseline_has_zero_advantage() -> None:
    adv, baseline = losses.advantages([0.7], ["x"], baseline=None, baseline_decay=0.9)
    assert adv == [0.0]
    assert baseline == pytest.approx(0.7)
    adv, baseline = losses.advantages([1.0], ["y"], baseline=baseline, baseline_decay=0.9)
    assert adv == pytest.approx([0.3])
    assert baseline == pytest.approx(0.73)


def test_truncated_importance_weights() -> None:
    logp = torch.tensor([[math.log(0.5), math.log(0.2)]])
    logp_s = torch.tensor([[math.log(0.25), math.log(0.4)]])
    w = losses.truncated_importance_weights(logp, logp_s, ratio_max=1.5)
    assert w.tolist()[0] == pytest.approx([1.5, 0.5])  # ratio 2.0 truncated to 1.5; 0.5 kept


def test_policy_gradient_loss_and_gradient() -> None:
    logp = torch.tensor([[math.log(0.5), math.log(0.2), 0.0]], requires_grad=True)
    logp_s = torch.tensor([[math.log(0.25), math.log(0.4), 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv = torch.tensor([2.0])
    per_token = losses.policy_gradient_loss(logp, logp_s, adv, mask, ratio_max=1.5)
    # -w * A * logp: -1.5*2*ln0.5 = 2.0794, -0.5*2*ln0.2 = 1.6094, masked 0
    assert per_token.tolist()[0] == pytest.approx([2.0794415, 1.6094379, 0.0], abs=1e-6)
    per_token.sum().backward()
    # d/dlogp = -w * A (the weight carries no gradient)
    assert logp.grad.tolist()[0] == pytest.approx([-3.0, -1.0, 0.0])


def test_kl_k3_estimator() -> None:
    logp = torch.tensor([[math.log(0.5), math.log(0.2)]])
    logp_ref = torch.tensor([[math.log(0.25), math.log(0.2)]])
    kl = losses.kl_to_reference(logp, logp_ref, torch.ones(1, 2))
    # d = ln(0.25/0.5) = -ln2: e^d - d - 1 = 0.5 + 0.693147 - 1 = 0.193147; equal logprobs: 0
    assert kl.tolist()[0] == pytest.approx([0.1931472, 0.0], abs=1e-6)


def test_total_loss_is_token_mean_of_pg_plus_kl() -> None:
    logp = torch.tensor([[math.log(0.5), math.log(0.2)], [math.log(0.1), 0.0]])
    logp_s = logp.clone()  # on-policy: every weight is 1
    logp_ref = torch.tensor([[math.log(0.25), math.log(0.2)], [math.log(0.1), 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    loss, stats = losses.total_loss(logp, logp_s, logp_ref, adv, mask, kl_coef=0.1, ratio_max=2.0)
    pg = (-math.log(0.5) - math.log(0.2) + math.log(0.1)) / 3  # = (0.693147 + 1.609438 - 2.302585) / 3 = 0
    kl = 0.1931472 / 3
    assert stats["pg_loss"] == pytest.approx(pg, abs=1e-6)
    assert stats["kl_ref"] == pytest.approx(kl, abs=1e-6)
    assert float(loss) == pytest.approx(pg + 0.1 * kl, abs=1e-6)
    assert stats["ratio_mean"] == pytest.approx(1.0) and stats["truncated_frac"] == 0.0

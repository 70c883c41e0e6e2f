"""The pipeline stage (reference logprobs ahead of the step) and the device setting."""

from __future__ import annotations

import pytest
import torch

from services.trainer import distributed, policy
from services.trainer.batching import collate, may_train, prompt_key, shortest_first
from services.trainer.settings import TrainerSettings
from tests.trainer_helpers import MODEL, make_samples, produce


def test_may_train_skips_only_groups_whose_rewards_are_all_equal() -> None:
    rewards = [1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.5, 2.0]
    groups = [b"a", b"a", b"b", b"b", b"c", b"c", b"c", b"d"]
    assert may_train(rewards, groups) == [False, False, True, True, False, False, False, True]
    assert may_train([], []) == []


def test_shortest_first_is_a_stable_length_order() -> None:
    assert shortest_first([5, 2, 9, 2, 7]) == [1, 3, 0, 4, 2]
    assert shortest_first([]) == []


def test_device_auto_resolves_to_cuda_only_when_available() -> None:
    assert policy.resolve_device("auto", cuda_available=False) == torch.device("cpu")
    assert policy.resolve_device("auto", cuda_available=True) == torch.device("cuda")
    assert policy.resolve_device("cpu", cuda_available=True) == torch.device("cpu")
    assert policy.resolve_device("cuda:1", cuda_available=True) == torch.device("cuda:1")
    with pytest.raises(ValueError, match="trainer_device"):
        policy.resolve_device("cuda", cuda_available=False)
    assert policy.use_bf16(None, torch.device("cuda")) and not policy.use_bf16(None, torch.device("cpu"))
    assert policy.use_bf16(True, torch.device("cpu")) and not policy.use_bf16(False, torch.device("cuda"))


def test_device_setting_is_validated() -> None:
    with pytest.raises(ValueError, match="trainer_device"):
        TrainerSettings(_env_file=None, trainer_device="tpu")
    assert TrainerSettings(_env_file=None).trainer_device == "auto"


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_reference_logprobs_from_the_pipeline_give_the_same_gradients(tiny_model_dir) -> None:
    """Precomputed reference logprobs (any subset of rows, the rest computed at the step)
    give the same gradients as computing them all at the step."""
    from services.trainer.loop import accumulate_gradients

    s = TrainerSettings(_env_file=None, trainer_batch_size=6, trainer_micro_batch_size=4, kl_coef=0.5)
    model, tok = policy.load(tiny_model_dir)
    with torch.no_grad():  # move the policy away from the reference so the KL has a gradient
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    reference, _ = policy.load(tiny_model_dir)
    reference = policy.frozen_copy(reference)
    samples = make_samples(6, vocab=len(tok))
    col = collate(samples, s.max_seq_tokens, policy.pad_id(tok))
    adv = torch.tensor([0.5, -0.5, 0.25, -0.25, 1.0, -1.0])
    work = distributed.StepWork(col, adv, col.n_tokens)

    figures_inline = accumulate_gradients(model, reference, work, s, None)
    inline = _grads(model)
    model.zero_grad(set_to_none=True)

    ref = torch.zeros_like(col.sampler_logp)
    with torch.no_grad():
        full = policy.token_logprobs(reference, col.input_ids, col.attention_mask, col.completion_mask)
    ready = torch.tensor([True, True, False, True, True, True])
    ref[ready] = full[ready]
    col.ref_logp, col.ref_ready = ref, ready
    figures_ahead = accumulate_gradients(model, reference, distributed.StepWork(col, adv, col.n_tokens), s, None)
    ahead = _grads(model)
    assert figures_inline["kl_ref"] > 0 and figures_ahead == pytest.approx(figures_inline, rel=1e-6)
    assert inline.keys() == ahead.keys() and all(torch.allclose(inline[k], ahead[k], atol=1e-7) for k in inline)
    # rows() carries the precomputed tensors along with the row selection.
    part = col.rows([0, 1])
    assert part.has_reference() and torch.equal(part.ref_logp, full[[0, 1], : part.ref_logp.shape[1]])
    assert not col.rows([2, 3]).has_reference()


def test_token_logprobs_answer_on_the_inputs_device(tiny_model_dir) -> None:
    model, tok = policy.load(tiny_model_dir)
    col = collate(make_samples(2, vocab=len(tok)), 64, policy.pad_id(tok))
    out = policy.token_logprobs(model, col.input_ids, col.attention_mask, col.completion_mask)
    assert out.device == col.input_ids.device and out.shape == col.completion_mask.shape
    assert bool((out[col.completion_mask.bool()] < 0).all()) and bool((out[~col.completion_mask.bool()] == 0).all())


@pytest.mark.parametrize("pipelined", [True, False])
def test_trainer_computes_reference_logprobs_in_the_pipeline_stage(
    pipelined, tmp_path, tiny_model_dir, kafka_bootstrap, topic_prefix
) -> None:
    """Through the real broker: every batch reaches the step with the reference's
    logprobs of its trainable rows; groups with equal rewards are skipped; CPU device."""
    from schemas.topics import SAMPLES
    from services.trainer.loop import Trainer

    samples = make_samples(16, group=2)
    # one group whose two rewards are equal: no reference forward for it
    samples[0] = samples[0].model_copy(update={"reward": 1.0})
    samples[1] = samples[1].model_copy(update={"reward": 1.0})
    produce(kafka_bootstrap, SAMPLES.full_name(topic_prefix), samples)
    s = TrainerSettings(
        _env_file=None,
        home_dir=tmp_path / "home",
        topic_prefix=topic_prefix,
        model_name=MODEL,
        model_dir=tiny_model_dir,
        trainer_batch_size=16,  # one batch: the equal-reward group is in it
        trainer_micro_batch_size=4,
        trainer_batch_wait_s=5.0,
        heldout_every=10**9,
        publish_every_s=0,
        gate_enabled=False,
        follow_rollbacks=False,
        pipelined=pipelined,
        kl_coef=0.1,
    )
    trainer = Trainer(s, kafka_bootstrap)
    assert trainer.device == torch.device("cpu") and not trainer.bf16
    seen = []
    step = trainer.step

    def spy(batch):
        seen.append(batch.collated)
        return step(batch)

    trainer.step = spy
    stats = trainer.run(idle_exit_s=2.0)
    assert stats["samples"] == 16 and stats["optimizer_steps"] >= 1
    assert stats["ref_rows"] + stats["ref_rows_skipped"] == 16 and stats["ref_rows_skipped"] >= 2
    for col in seen:
        assert col.ref_logp is not None and col.ref_ready is not None
    skipped_rows = sum(int((~c.ref_ready).sum()) for c in seen)
    assert skipped_rows == stats["ref_rows_skipped"]
    # a computed row is the reference's logprob of the completion tokens, nothing elsewhere
    col = seen[-1]
    rows = [i for i in range(len(col.ref_ready)) if col.ref_ready[i]]
    part = col.rows(rows)
    with torch.no_grad():
        want = policy.token_logprobs(trainer.reference, part.input_ids, part.attention_mask, part.completion_mask)
    assert torch.allclose(part.ref_logp, want, atol=1e-6)
    assert prompt_key(samples[0]) == prompt_key(samples[1])
    # where the time went, per stage, is recorded (bench/trainer.py reports it)
    assert stats["reader_prepare_cpu_s"] > 0 and stats["step_cpu_s"] > 0
    assert stats["reader_stage_cpu_s"] >= stats["reader_prepare_cpu_s"]
    assert stats["reader_prepare_s"] >= stats["prepare_s"] > 0
    assert all(stats[f"reader_{k}"] >= 0 for k in ("consume_s", "decode_s", "collate_s", "handoff_s"))
    if not pipelined:  # nothing is handed over between threads
        assert stats["reader_handoff_s"] == 0


def test_pipeline_bound_is_the_sum_over_the_slower_stage() -> None:
    """bench/trainer.py's prediction: two stages overlap at best to the slower one."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "trainer.py"
    spec = importlib.util.spec_from_file_location("bench_trainer", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # (rounded to 3 places)
    assert bench.pipeline_bound({"consume_s": 0.5, "prepare_s": 0.5}, 3.0) == pytest.approx(4 / 3, abs=1e-3)
    assert bench.pipeline_bound({"prepare_s": 2.0}, 2.0) == 2.0  # balanced: the 2x ceiling
    assert bench.pipeline_bound({"prepare_s": 3.0}, 1.0) == pytest.approx(4 / 3, abs=1e-3)
    assert bench.pipeline_bound({"prepare_s": 0.0}, 0.0) == 1.0

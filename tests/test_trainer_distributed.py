"""The data-parallel trainer: 2 gloo ranks on CPU end with the weights of one process.

Why `torch.equal` and not a tolerance: with a step of at most 2 micro-batches (batch 8,
micro-batch 4) each rank computes one micro-batch, and the all-reduce adds the same two
gradients the single process accumulates (a + b, commutative in IEEE arithmetic, and a
rank without a micro-batch adds exact zeros). Clip and AdamW then run on identical
numbers. Both runs use one torch thread, so every kernel reduces in the same order. With
more micro-batches than ranks the sums group differently ((a + c) + (b + d)) and the
weights would agree only to float32 rounding (about 1e-6 relative per step).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch
import torch.multiprocessing as mp

from schemas.codec import encode, key_of
from schemas.topics import SAMPLES
from services.kafka.producers import producer_config
from services.trainer import distributed, policy, state
from services.trainer.batching import collate
from services.trainer.settings import TrainerSettings
from tests.trainer_helpers import MODEL, make_samples

STEPS = 4
BATCH = 8


def _settings_kwargs(home: Path, model_dir: Path, prefix: str) -> dict[str, Any]:
    return {
        "home_dir": home,
        "topic_prefix": prefix,
        "model_name": MODEL,
        "model_dir": model_dir,
        "trainer_batch_size": BATCH,
        "trainer_micro_batch_size": BATCH // 2,
        # All samples are on the broker before the run: batches fill without waiting, and
        # a generous wait keeps a slow fetch from cutting a batch short.
        "trainer_batch_wait_s": 10.0,
        "heldout_every": 1_000_000_007,
        "checkpoint_every_steps": 1000,
        "publish_every_s": 0,
        "lr": 1e-3,
        "kl_coef": 0.05,
        "trainer_dist_timeout_s": 300.0,
    }


def _rank_main(rank: int, port: int, kwargs: dict[str, Any], bootstrap: str, out: str) -> None:
    """One rank of the 2-process run, as torchrun would start it (env:// rendezvous)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from services.trainer.loop import Trainer, follow

    settings = TrainerSettings(_env_file=None, **kwargs)
    group = distributed.init_from_env(settings.trainer_dist_timeout_s)
    assert group is not None and group.rank == rank
    if group.is_leader:
        Trainer(settings, bootstrap, group=group).run(max_steps=STEPS)
    else:
        model = follow(settings, group)
        torch.save(policy.copy_weights(model), Path(out) / "rank1.pt")
    distributed.close(group)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_micro_batches_are_dealt_round_robin() -> None:
    two = [distributed.Group(rank=r, world_size=2) for r in range(2)]
    assert distributed.micro_batches(10, 4, None) == [(0, 4), (4, 8), (8, 10)]
    assert distributed.micro_batches(10, 4, two[0]) == [(0, 4), (8, 10)]
    assert distributed.micro_batches(10, 4, two[1]) == [(4, 8)]
    assert distributed.micro_batches(3, 4, two[1]) == []


def test_step_work_survives_pickling() -> None:
    import pickle

    col = collate(make_samples(3), 64, 0)
    work = distributed.StepWork(col, torch.tensor([0.5, -0.5, 1.0]), col.n_tokens)
    back = pickle.loads(pickle.dumps(work))
    assert torch.equal(back.collated.input_ids, col.input_ids) and back.n_tokens == col.n_tokens


@pytest.mark.timeout(300)
def test_two_gloo_ranks_train_the_same_weights_as_one_process(
    tmp_path: Path, tiny_model_dir: Path, kafka_bootstrap: str, topic_prefix: str
) -> None:
    from confluent_kafka import Producer

    from services.trainer.loop import Trainer

    # One partition, so both runs consume the samples in the same order.
    topic = SAMPLES.full_name(topic_prefix)
    producer = Producer(producer_config(kafka_bootstrap))
    for sample in make_samples(STEPS * BATCH, seed=3):
        producer.produce(topic, encode(sample), key=key_of(sample, SAMPLES.key), partition=0)
    assert producer.flush(30) == 0

    single = Trainer(
        TrainerSettings(_env_file=None, **_settings_kwargs(tmp_path / "single", tiny_model_dir, topic_prefix)),
        kafka_bootstrap,
    )
    single.run(max_steps=STEPS)
    assert single.meta.optimizer_steps >= 2
    expected = policy.copy_weights(single.model)
    single_meta = single.meta
    del single  # its librdkafka clients go before the broker fixture does

    kwargs = _settings_kwargs(tmp_path / "ddp", tiny_model_dir, topic_prefix)
    mp.spawn(_rank_main, args=(_free_port(), kwargs, kafka_bootstrap, str(tmp_path)), nprocs=2, join=True)

    state_dir = state.model_state_dir(tmp_path / "ddp" / "trainer", MODEL)
    meta, leader, _ = state.load(state.latest(state_dir))
    ledger = [orjson.loads(line) for line in (state_dir / "ledger.jsonl").read_bytes().splitlines()]
    assert any(step["trained"] > BATCH // 2 for step in ledger), "rank 1 never got a micro-batch"
    assert meta.step == STEPS and meta.optimizer_steps == single_meta.optimizer_steps
    assert meta.offsets == single_meta.offsets
    follower = torch.load(tmp_path / "rank1.pt")
    assert expected.keys() == leader.keys() == follower.keys()
    for name, tensor in expected.items():
        assert torch.equal(leader[name], tensor), name
        assert torch.equal(follower[name], tensor), name
    # Rank 0 alone checkpoints: the follower wrote nothing but the file the test asked for.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "rank1.pt", "single"]

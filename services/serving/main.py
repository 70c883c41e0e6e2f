"""`rlfeed serve`: one serving replica (OpenAI API) until SIGINT/SIGTERM.

Settings come from `RLFEED_*` variables (`ServingSettings`); heavy modules (torch,
transformers, vllm) are imported only after they are read.
"""

from __future__ import annotations


def main() -> None:
    """Read the settings and serve until SIGINT/SIGTERM."""
    from services.logs import setup
    from services.serving.settings import ServingSettings

    settings = ServingSettings()
    setup(settings.log_level)
    from services.serving.server import run_forever

    run_forever(settings)


if __name__ == "__main__":
    main()

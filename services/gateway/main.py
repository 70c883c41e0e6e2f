"""`rlfeed gateway`: the ingest gateway until SIGINT/SIGTERM."""

from __future__ import annotations

import sys


def main() -> None:
    """Read the settings and serve until SIGINT/SIGTERM."""
    from services.gateway.server import NoBroker, run_forever
    from services.gateway.settings import GatewaySettings
    from services.logs import setup

    settings = GatewaySettings()
    setup(settings.log_level)
    try:
        run_forever(settings)
    except NoBroker as exc:
        print(str(exc), file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()

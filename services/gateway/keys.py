"""`rlfeed keys create` for the gateway's key file (`GatewaySettings.resolved_keys_file`).

The keys themselves (format, hashing, the file, `KeyStore`) live in the shared library
`services.apikeys`.
"""

from __future__ import annotations

from services import apikeys


def create_key_cli(tenant: str) -> int:
    """`rlfeed keys create --tenant T`: print a new key once (stdout) and where it is stored."""
    from services.gateway.settings import GatewaySettings

    return apikeys.create_key_cli(tenant, GatewaySettings().resolved_keys_file)

"""API keys of tenants (`rlf_<key_id>_<secret>`, stored hashed in a JSON key file):
created by `rlfeed keys create`, checked by the gateway (ingest) and the dashboard
(viewers). A library both processes import; see `services.apikeys.store`."""

from services.apikeys.store import (
    KEY_PREFIX,
    KeyRecord,
    KeyStore,
    add_record,
    create_key,
    create_key_cli,
    hash_secret,
    load_records,
    new_key,
    parse_key,
    verify,
)

__all__ = [
    "KEY_PREFIX",
    "KeyRecord",
    "KeyStore",
    "add_record",
    "create_key",
    "create_key_cli",
    "hash_secret",
    "load_records",
    "new_key",
    "parse_key",
    "verify",
]

"""Per-tenant API keys, stored hashed: the key file the gateway checks requests against
and the dashboard checks viewers against (a shared library, owned by neither process).

A key looks like `rlf_<key_id>_<secret>`: `key_id` (12 hex) finds the record, the secret
(32 random bytes, url-safe base64) is checked against `sha256(salt || secret)` with a
constant-time compare. Keys are random, not passwords, so a salted sha256 is enough (a
slow KDF would cost milliseconds on every request). The plain key is printed once by
`rlfeed keys create --tenant T` and never stored.

The key file (JSON, mode 0600) is written atomically; the gateway re-reads it when it
changes, so a new key works without a restart.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

KEY_PREFIX = "rlf_"
_KEY_RE = re.compile(r"^rlf_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_TENANT_RE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


@dataclass(frozen=True)
class KeyRecord:
    """One stored key: everything but the secret."""

    key_id: str
    tenant: str
    salt: str
    """Hex salt."""
    sha256: str
    """Hex sha256 of salt bytes + secret bytes."""
    created_at_ms: int


def hash_secret(salt_hex: str, secret: str) -> str:
    """The stored digest of a secret."""
    return hashlib.sha256(bytes.fromhex(salt_hex) + secret.encode()).hexdigest()


def new_key(tenant: str) -> tuple[str, KeyRecord]:
    """A fresh key for `tenant`: (the plain key, its record)."""
    if not _TENANT_RE.match(tenant):
        raise ValueError(f"tenant: {tenant!r} must be 1-128 characters of A-Z a-z 0-9 . _ : @ / + = -")
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    record = KeyRecord(key_id, tenant, salt, hash_secret(salt, secret), time.time_ns() // 1_000_000)
    return f"{KEY_PREFIX}{key_id}_{secret}", record


def parse_key(key: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed key, else None."""
    m = _KEY_RE.match(key)
    return (m.group(1), m.group(2)) if m else None


def verify(records: dict[str, KeyRecord], key: str) -> str | None:
    """The tenant a key belongs to, or None if it is malformed, unknown or wrong."""
    parsed = parse_key(key)
    if parsed is None:
        return None
    record = records.get(parsed[0])
    if record is None:
        return None
    if not hmac.compare_digest(hash_secret(record.salt, parsed[1]), record.sha256):
        return None
    return record.tenant


def load_records(path: Path) -> dict[str, KeyRecord]:
    """The key file's records by key_id ({} if the file does not exist)."""
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    return {r["key_id"]: KeyRecord(**r) for r in data.get("keys", [])}


def add_record(path: Path, record: KeyRecord) -> None:
    """Append a record to the key file (created 0600 if missing), atomically."""
    records = load_records(path)
    records[record.key_id] = record
    payload = {"version": 1, "keys": [asdict(r) for r in records.values()]}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".gateway-keys.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps(payload, option=orjson.OPT_INDENT_2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def create_key(path: Path, tenant: str) -> str:
    """Create, store (hashed) and return a new plain key for `tenant`."""
    key, record = new_key(tenant)
    add_record(path, record)
    return key


class KeyStore:
    """A view of the key file (the gateway's, the dashboard's), re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._records: dict[str, KeyRecord] = {}
        self._stamp: tuple[int, int] | None = None
        self.reload()

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def reload(self) -> None:
        """Read the key file now."""
        self._stamp = self._file_stamp()
        self._records = load_records(self.path)

    def __len__(self) -> int:
        return len(self._records)

    def tenant_of(self, key: str) -> str | None:
        """The tenant of a valid key, else None. An unknown key id re-reads a changed file."""
        tenant = verify(self._records, key)
        if tenant is None and (parsed := parse_key(key)) and parsed[0] not in self._records:
            stamp = self._file_stamp()
            if stamp != self._stamp:
                self.reload()
                tenant = verify(self._records, key)
        return tenant


def create_key_cli(tenant: str, path: Path) -> int:
    """A command's body: store a new key for `tenant` in `path`, print it once (stdout)
    and where it is stored (stderr); 2 for a bad tenant."""
    try:
        key = create_key(path, tenant)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(key)
    print(f"stored hashed in {path.resolve()} for tenant {tenant!r}; the key is not shown again", file=sys.stderr)
    return 0

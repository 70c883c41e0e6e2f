"""Versioned, idempotent ClickHouse migrations from `ops/clickhouse/migrations/*.sql`.

Files are named `NNNN_description.sql` and applied in order, each once; applied versions
are recorded in the `schema_migrations` table. Statements inside a file are separated by
a semicolon at the end of a line, and each should be idempotent on its own
(`IF NOT EXISTS`), so a migration interrupted half-way can simply run again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from clickhouse_connect.driver.client import Client

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "ops" / "clickhouse" / "migrations"
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


def load(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations in `directory`, ordered by version."""
    out = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise ValueError(f"migration file {path.name} is not named NNNN_description.sql")
        sql = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("--"))
        statements = tuple(s.strip() for s in re.split(r";\s*$", sql, flags=re.M) if s.strip())
        out.append(Migration(int(match.group(1)), path.stem, statements))
    versions = [m.version for m in out]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration versions in {directory}")
    return out


def apply(client: Client, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply every migration not yet recorded; return the names applied."""
    client.command(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version UInt32, name String, "
        "applied_at DateTime64(3) DEFAULT now64(3)) ENGINE = ReplacingMergeTree ORDER BY version"
    )
    done = {row[0] for row in client.query("SELECT version FROM schema_migrations").result_rows}
    applied = []
    for migration in load(directory):
        if migration.version in done:
            continue
        for statement in migration.statements:
            client.command(statement)
        client.insert("schema_migrations", [[migration.version, migration.name]], column_names=["version", "name"])
        applied.append(migration.name)
    return applied

"""ClickHouse clients from rlfeed URLs: `chdb:///path` (embedded) or `http(s)://` servers.

chdb runs ClickHouse inside this process and locks its data directory: one process
owns the embedded database, and one process can open only one data path.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from clickhouse_connect.driver.client import Client

DEFAULT_DATABASE = "rlfeed"
_DB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def database_of(url: str) -> str:
    """The database an URL names: the path of an http URL, `?database=` for chdb."""
    parts = urlsplit(url)
    if parts.scheme == "chdb":
        match = re.search(r"(?:^|&)database=([^&]+)", parts.query)
        return match.group(1) if match else DEFAULT_DATABASE
    return parts.path.strip("/") or DEFAULT_DATABASE


def connect(url: str, database: str | None = None) -> Client:
    """A client for `url`, with `database` (or the URL's) created and selected."""
    import clickhouse_connect

    db = database or database_of(url)
    if not _DB_NAME.match(db):
        raise ValueError(f"clickhouse_url: invalid database name {db!r}")
    parts = urlsplit(url)
    if parts.scheme == "chdb":
        dsn = f"chdb://{parts.netloc}{parts.path}"
        bootstrap = clickhouse_connect.get_client(dsn=dsn)
    elif parts.scheme in ("http", "https"):
        dsn = parts._replace(path="/default").geturl()
        bootstrap = clickhouse_connect.get_client(dsn=dsn)
    else:
        raise ValueError(f"clickhouse_url: expected chdb:// or http(s)://, got {url!r}")
    bootstrap.command(f"CREATE DATABASE IF NOT EXISTS {db}")
    if parts.scheme == "chdb":
        return clickhouse_connect.get_client(dsn=dsn, database=db)
    return clickhouse_connect.get_client(dsn=parts._replace(path=f"/{db}").geturl())

"""`kafka://host:port[,host:port]` URLs."""

from __future__ import annotations

from urllib.parse import urlsplit


def bootstrap_servers(url: str) -> str:
    """The `host:port,host:port` bootstrap list of a `kafka://` URL (a bare list passes)."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.scheme != "kafka":
        raise ValueError(f"kafka_url: expected kafka://host:port[,host:port], got scheme {parts.scheme!r}")
    servers = parts.netloc
    if not servers:
        raise ValueError(f"kafka_url: no host in {url!r}")
    for server in servers.split(","):
        host, sep, port = server.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"kafka_url: {server!r} is not host:port")
    return servers


def kafka_url(bootstrap: str) -> str:
    """The `kafka://` URL of a bootstrap list."""
    return f"kafka://{bootstrap}"

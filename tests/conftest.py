"""Session fixtures: one real Kafka-protocol broker and one chdb-backed ClickHouse.

With `RLFEED_KAFKA_URL` / `RLFEED_CLICKHOUSE_URL` set, the suite uses those servers
instead of starting its own. Tests isolate themselves with a unique topic prefix
(`topic_prefix`) and a unique ClickHouse database (`clickhouse`).
"""

from __future__ import annotations

import gc
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.kafka.url import bootstrap_servers


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`host:port` of the broker under test: RLFEED_KAFKA_URL's, or a fresh embedded one."""
    url = os.environ.get("RLFEED_KAFKA_URL")
    if url:
        yield bootstrap_servers(url)
        return
    from services.kafka.embedded import EmbeddedBroker

    with EmbeddedBroker(tmp_path_factory.mktemp("broker")) as broker:
        yield broker.bootstrap
        # Clients the tests no longer reference, destroyed while their broker still answers
        # (else librdkafka logs "Connection refused" from them at interpreter exit).
        gc.collect()


@pytest.fixture
def topic_prefix(kafka_bootstrap: str) -> str:
    """A prefix unique to this test, with every registry topic created under it."""
    from services.kafka.topics import ensure_topics

    prefix = f"t{uuid.uuid4().hex[:10]}."
    ensure_topics(kafka_bootstrap, prefix)
    return prefix


@pytest.fixture(scope="session")
def clickhouse_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """RLFEED_CLICKHOUSE_URL, or a chdb data directory for this session (one per process)."""
    return os.environ.get("RLFEED_CLICKHOUSE_URL") or f"chdb://{tmp_path_factory.mktemp('chdb')}"


@pytest.fixture
def clickhouse(clickhouse_url: str):
    """A client on a fresh database with every migration applied."""
    from services.clickhouse import migrations
    from services.clickhouse.client import connect

    database = f"t_{uuid.uuid4().hex[:10]}"
    client = connect(clickhouse_url, database)
    migrations.apply(client)
    yield client
    client.command(f"DROP DATABASE IF EXISTS {database}")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(repo_root: Path) -> Path:
    """The tiny random model (real tokenizer, 2 small layers), built once and cached."""
    from services.localmodel.build import build

    return build(repo_root / ".rlfeed" / "test-cache" / "tiny-model", "tiny")

"""The settings base every process's settings model extends.

Each process has exactly one pydantic-settings model, read from environment variables
with the `RLFEED_` prefix (e.g. `RLFEED_KAFKA_URL`). Field docstrings are the docs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _store_location(value: Any) -> Any:
    """A path given as a Path object becomes its string; strings pass unchanged."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


StoreLocation = Annotated[str, BeforeValidator(_store_location)]
"""Where a checkpoint store lives: a local directory or an fsspec URL (`file:///srv/ckpt`,
`s3://bucket/prefix`, `memory://name`); see services/checkpoints/store.py."""


class RlfeedSettings(BaseSettings):
    """Where the shared infrastructure is. Unset URLs mean: use the embedded stack."""

    model_config = SettingsConfigDict(env_prefix="RLFEED_", extra="ignore", use_attribute_docstrings=True)

    kafka_url: str | None = None
    """`kafka://host:port[,host:port]` of a running broker; unset: the embedded broker."""
    kafka_idle_pause_ms: int = Field(250, ge=0)
    """Idle consumers wait this long before fetching again, so they do not spin on a broker
    that answers empty fetches at once (the embedded one: an idle consumer took a core,
    services/kafka/idle.py): aiokafka (the Faust worker's) after an empty fetch, librdkafka
    ones that use `EndPauses` after reaching a partition's end. 0: off."""
    clickhouse_url: str | None = None
    """`http(s)://user:pass@host:8123/db` or `chdb:///path`; unset: chdb under home_dir."""
    topic_prefix: str = ""
    """Prepended to every topic name, so several stacks can share one broker."""
    home_dir: Path = Path(".rlfeed")
    """Where the embedded stack keeps its data (broker log, chdb, models, checkpoints)."""
    log_level: str = "info"
    """Log level for the JSON log lines (debug, info, warning, error)."""

    # --- Kafka client security (every client: services/kafka/security.py) ---
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """How clients talk to the brokers (Kafka's security.protocol)."""
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    """SASL mechanism when the protocol is SASL_*; ignored otherwise."""
    kafka_sasl_username: str | None = None
    """SASL user name; required when the protocol is SASL_*."""
    kafka_sasl_password: SecretStr | None = None
    """SASL password; required when the protocol is SASL_* (never logged)."""
    kafka_ssl_ca_file: Path | None = None
    """PEM file of the CA that signed the brokers' certificates (SSL, SASL_SSL); unset:
    the system trust store."""

    # --- checkpoint store on S3-compatible storage (`checkpoint_dir=s3://bucket/prefix`) ---
    checkpoint_s3_endpoint_url: str | None = None
    """S3 API endpoint of an `s3://` checkpoint store on S3-compatible storage (MinIO,
    Ceph, R2: e.g. `http://minio:9000`); unset: AWS S3."""
    checkpoint_s3_region: str | None = None
    """Region of the `s3://` checkpoint store's bucket; unset: the AWS default chain."""
    checkpoint_s3_access_key_id: SecretStr | None = None
    """Access key id for the `s3://` checkpoint store; unset: the AWS credential chain
    (AWS_* variables, shared config, instance or pod role). Never logged."""
    checkpoint_s3_secret_access_key: SecretStr | None = None
    """Secret access key belonging to checkpoint_s3_access_key_id (set both or neither)."""

    @model_validator(mode="after")
    def _check_checkpoint_s3(self) -> RlfeedSettings:
        if (self.checkpoint_s3_access_key_id is None) != (self.checkpoint_s3_secret_access_key is None):
            raise ValueError("checkpoint_s3_access_key_id and checkpoint_s3_secret_access_key: set both or neither")
        return self

    def checkpoint_storage_options(self) -> dict[str, Any]:
        """fsspec (s3fs) options of an `s3://` checkpoint store, from the settings above."""
        options: dict[str, Any] = {}
        client: dict[str, str] = {}
        if self.checkpoint_s3_endpoint_url:
            client["endpoint_url"] = self.checkpoint_s3_endpoint_url
        if self.checkpoint_s3_region:
            client["region_name"] = self.checkpoint_s3_region
        if client:
            options["client_kwargs"] = client
        if self.checkpoint_s3_access_key_id is not None and self.checkpoint_s3_secret_access_key is not None:
            options["key"] = self.checkpoint_s3_access_key_id.get_secret_value()
            options["secret"] = self.checkpoint_s3_secret_access_key.get_secret_value()
        return options

    @model_validator(mode="after")
    def _check_kafka_security(self) -> RlfeedSettings:
        sasl = self.kafka_security_protocol.startswith("SASL_")
        if sasl and (not self.kafka_sasl_username or self.kafka_sasl_password is None):
            raise ValueError("kafka_sasl_username and kafka_sasl_password: required with a SASL_* protocol")
        if self.kafka_ssl_ca_file is not None and not self.kafka_security_protocol.endswith("SSL"):
            raise ValueError("kafka_ssl_ca_file: only used with the SSL or SASL_SSL protocol")
        return self

    @property
    def default_model_dir(self) -> Path:
        """Where `rlfeed model build` puts the policy model unless told otherwise."""
        return self.home_dir / "models" / "smollm2-135m-instruct"

    @property
    def embedded_clickhouse_url(self) -> str:
        """The chdb URL the embedded stack uses when clickhouse_url is unset."""
        return f"chdb://{(self.home_dir / 'clickhouse').resolve()}"

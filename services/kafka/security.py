"""Kafka client security (SSL, SASL) for each client library, from one set of settings.

Every Kafka client in rlfeed gets its connection settings from one function per library:

- `librdkafka_config` for confluent-kafka producers, consumers and admin clients;
- `aiokafka_options` for aiokafka producers and consumers (the SDK's kafka transport);
- `faust_credentials` for the Faust app's broker connection.

They read the `RLFEED_KAFKA_SECURITY_PROTOCOL`, `RLFEED_KAFKA_SASL_*` and
`RLFEED_KAFKA_SSL_CA_FILE` fields of the settings base. A caller that holds its
process's settings passes them; a client built deep inside a component that only knows
the bootstrap list (the gateway's producer, a replica's update follower) passes none,
and the same variables are read from the environment, which is where every process's
settings come from anyway. With the default PLAINTEXT nothing is added, so an embedded
or plaintext broker sees exactly the configuration it saw before.
"""

from __future__ import annotations

import ssl
from typing import Any

from services.config import RlfeedSettings


def _settings(settings: RlfeedSettings | None) -> RlfeedSettings:
    return settings if settings is not None else RlfeedSettings()


def librdkafka_config(bootstrap: str, settings: RlfeedSettings | None = None) -> dict[str, Any]:
    """`bootstrap.servers` plus the security keys of a confluent-kafka client; merge
    client-specific keys into it. `settings` None: read from the environment."""
    s = _settings(settings)
    config: dict[str, Any] = {"bootstrap.servers": bootstrap}
    if s.kafka_security_protocol == "PLAINTEXT":
        return config
    config["security.protocol"] = s.kafka_security_protocol.lower()
    if s.kafka_security_protocol.startswith("SASL_"):
        assert s.kafka_sasl_password is not None  # checked by the settings validator
        config["sasl.mechanism"] = s.kafka_sasl_mechanism
        config["sasl.username"] = s.kafka_sasl_username
        config["sasl.password"] = s.kafka_sasl_password.get_secret_value()
    if s.kafka_ssl_ca_file is not None:
        config["ssl.ca.location"] = str(s.kafka_ssl_ca_file)
    return config


def ssl_context(settings: RlfeedSettings | None = None) -> ssl.SSLContext | None:
    """The TLS context of the Python clients (aiokafka, Faust); None without TLS."""
    s = _settings(settings)
    if not s.kafka_security_protocol.endswith("SSL"):
        return None
    cafile = str(s.kafka_ssl_ca_file) if s.kafka_ssl_ca_file is not None else None
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)


def aiokafka_options(settings: RlfeedSettings | None = None) -> dict[str, Any]:
    """Keyword arguments of `AIOKafkaProducer` / `AIOKafkaConsumer` for the security
    settings (`bootstrap_servers` is the caller's)."""
    s = _settings(settings)
    options: dict[str, Any] = {"security_protocol": s.kafka_security_protocol}
    context = ssl_context(s)
    if context is not None:
        options["ssl_context"] = context
    if s.kafka_security_protocol.startswith("SASL_"):
        assert s.kafka_sasl_password is not None
        options["sasl_mechanism"] = s.kafka_sasl_mechanism
        options["sasl_plain_username"] = s.kafka_sasl_username
        options["sasl_plain_password"] = s.kafka_sasl_password.get_secret_value()
    return options


def faust_credentials(settings: RlfeedSettings | None = None) -> Any:
    """The `broker_credentials` of a Faust app (None for PLAINTEXT). Imports faust."""
    import faust

    s = _settings(settings)
    if s.kafka_security_protocol == "PLAINTEXT":
        return None
    context = ssl_context(s)
    if s.kafka_security_protocol == "SSL":
        return faust.SSLCredentials(context)
    assert s.kafka_sasl_password is not None
    # Faust picks SASL_SSL when it is given a TLS context, SASL_PLAINTEXT otherwise.
    return faust.SASLCredentials(
        username=s.kafka_sasl_username,
        password=s.kafka_sasl_password.get_secret_value(),
        mechanism=s.kafka_sasl_mechanism,
        ssl_context=context,
    )

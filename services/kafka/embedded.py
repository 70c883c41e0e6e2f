"""The embedded Kafka-protocol broker: noida-db as a subprocess on loopback.

Used by `rlfeed up` and the test suite when `RLFEED_KAFKA_URL` is unset. The broker
keeps its log under a project-local data directory, dies with its parent (so a
kill -9 of the stack leaves no orphan), and is stopped in two steps: its Kafka service
is closed and saved first (`close_kafka_service`: a bare SIGINT loses the writes
acknowledged while noida-db shuts down), then the process by pid with an escalation to
SIGKILL, because noida-db may ignore SIGTERM for seconds.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from services.child_process import die_with_parent
from services.kafka.url import bootstrap_servers, kafka_url

STATE_FILE = "broker.json"
"""Name of the file (under the stack's home dir) recording the running broker."""


def binary_path() -> Path:
    """The noida-db executable shipped inside the noida-db wheel."""
    return Path(str(importlib.resources.files("noida_db") / "noida-db"))


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def close_kafka_service(data_dir: Path, timeout_s: float) -> bool:
    """Ask the noida-db server on `data_dir` to close its Kafka listener and save (its
    `stop kafka` command); False if it did not answer within `timeout_s`.

    Needed before a SIGINT: on SIGINT noida-db 0.2.3 saves its state and then goes on
    acknowledging produce requests until it exits, and those writes are gone after a
    restart. Measured (a producer writing acks=all during the stop, 6 stops): 3-7k acked
    writes lost per SIGINT, none after `stop kafka` (it closes the port, then saves). The
    chaos test lost one accepted feedback event this way about one run in four."""
    try:
        done = subprocess.run(
            [str(binary_path()), "stop", "kafka", "--data-dir", str(data_dir)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout_s,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@dataclass
class RunningBroker:
    """A broker some process started: where it listens and who owns it."""

    url: str
    pid: int
    data_dir: str
    started_at: float

    def alive(self) -> bool:
        """Whether the broker's process still exists."""
        try:
            os.kill(self.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True


def read_state(home_dir: Path) -> RunningBroker | None:
    """The broker recorded under `home_dir` if its process is alive, else None."""
    path = home_dir / STATE_FILE
    try:
        broker = RunningBroker(**orjson.loads(path.read_bytes()))
    except (FileNotFoundError, ValueError, TypeError):
        return None
    return broker if broker.alive() else None


def find_bootstrap(url: str | None, home_dir: Path) -> str | None:
    """The `host:port` list of the broker a process should use: `url` (RLFEED_KAFKA_URL)
    if set, else the embedded broker running under `home_dir`, else None."""
    if url:
        return bootstrap_servers(url)
    broker = read_state(home_dir.resolve())
    return bootstrap_servers(broker.url) if broker is not None else None


class EmbeddedBroker:
    """A noida-db Kafka broker subprocess. Use as a context manager or start()/stop()."""

    def __init__(self, data_dir: Path, port: int = 0, state_dir: Path | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.state_dir = state_dir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return kafka_url(self.bootstrap)

    def start(self, timeout_s: float = 30.0) -> EmbeddedBroker:
        """Start the broker and wait until it answers metadata requests."""
        if _port_open(self.port):
            raise RuntimeError(f"port {self.port} is already in use; set RLFEED_EMBEDDED_KAFKA_PORT")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "broker.log", "ab")  # noqa: SIM115 - owned by the subprocess
        cmd = [str(binary_path()), "start", "--data-dir", str(self.data_dir), "--only", "kafka"]
        cmd += ["--kafka-port", str(self.port)]
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent
        )
        log.close()
        self._wait_ready(timeout_s)
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            state = RunningBroker(self.url, self.proc.pid, str(self.data_dir.resolve()), time.time())
            (self.state_dir / STATE_FILE).write_bytes(orjson.dumps(state.__dict__))
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                tail = (self.data_dir / "broker.log").read_bytes()[-2000:].decode(errors="replace")
                raise RuntimeError(f"noida-db exited with {self.proc.returncode}: {tail}")
            if _port_open(self.port):
                with contextlib.suppress(Exception):
                    AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=2)
                    return
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"noida-db did not answer on {self.bootstrap} within {timeout_s} s")

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop the broker without losing an acknowledged write: close and save its Kafka
        service (`close_kafka_service`), then end the process (SIGINT, SIGKILL after
        `grace_s`)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            close_kafka_service(self.data_dir, grace_s)
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.state_dir is not None:
            (self.state_dir / STATE_FILE).unlink(missing_ok=True)
        self.proc = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

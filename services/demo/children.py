"""Child processes of the demo: started with their own settings, logging to files,
dying with the demo (even on kill -9), stopped politely and then firmly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.child_process import die_with_parent


@dataclass
class Child:
    """One `rlfeed <command>` process."""

    name: str
    command: list[str]
    env: dict[str, str]
    log_dir: Path
    nice: int = 0
    """CPU priority increment of the process (and its children, e.g. the broker)."""
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def start(self) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.cli", *self.command],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=self._prepare,
            )
        return self

    def _prepare(self) -> None:
        """In the child before exec: die with the demo; lower the priority if asked."""
        die_with_parent()
        if self.nice:
            os.nice(self.nice)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, ready: Callable[[], bool], timeout_s: float) -> None:
        """Wait until `ready()` is true; raise with the log's tail if the child dies or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited early:\n{self.tail()}")
            try:
                if ready():
                    return
            except Exception:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready after {timeout_s} s:\n{self.tail()}")

    def tail(self, n_bytes: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-n_bytes:].decode(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after `grace_s`."""
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def child_env(base: dict[str, str], **settings: object) -> dict[str, str]:
    """`base` plus `RLFEED_<NAME>` for each setting (None removes it)."""
    env = dict(base)
    for key, value in settings.items():
        name = f"RLFEED_{key.upper()}"
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def base_env() -> dict[str, str]:
    """The demo's own environment, offline for model hubs."""
    return os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

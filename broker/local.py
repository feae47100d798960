"""A local MQTT broker in a child process: mosquitto when installed, else amqtt.

Both kinds run as subprocesses so that they can be stopped, killed and restarted on the same
port, which is what the fault-tolerance tests need.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

from edvit.errors import BrokerError
from edvit.limits import MAX_PACKET_BYTES
from edvit.process import python_module, stop_process

log = logging.getLogger(__name__)

Kind = Literal["mosquitto", "embedded"]
KindArg = Literal["auto", "mosquitto", "embedded"]

SYSTEM_MOSQUITTO = Path("/usr/sbin/mosquitto")
LOG_TAIL_CHARS = 2000
# Seconds to wait after each signal of the SIGINT -> SIGTERM -> SIGKILL escalation.
STOP_GRACE_S = 5.0


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS says is free now (it may be taken again before it is used)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    """True when nothing listens on host:port.

    SO_REUSEADDR mirrors what brokers do, so sockets left in TIME_WAIT by a broker that was
    just stopped do not count as "in use"; a live listener still makes bind fail.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def mosquitto_path() -> str | None:
    """The mosquitto binary, looked up on PATH and then where Debian puts it (/usr/sbin)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return str(SYSTEM_MOSQUITTO) if SYSTEM_MOSQUITTO.exists() else None


def resolve_kind(kind: KindArg) -> Kind:
    """'auto' means mosquitto when it is installed, else the embedded amqtt broker."""
    if kind == "auto":
        return "mosquitto" if mosquitto_path() else "embedded"
    if kind not in ("mosquitto", "embedded"):
        raise ValueError(f"unknown broker kind {kind!r}")
    return kind


# Every listener's settings after its access rules: no persistence, the contract's packet
# limit, logs on stderr.
COMMON_CONFIG_LINES = (
    "persistence false",
    "set_tcp_nodelay true",
    f"max_packet_size {MAX_PACKET_BYTES}",
    "log_dest stderr",
    "log_type error",
    "log_type warning",
    "log_type notice",
    "log_type information",
    "log_timestamp true",
    "",
)


def mosquitto_config(host: str, port: int) -> str:
    """A mosquitto 2.x config for one anonymous listener, logging to stderr.

    max_packet_size is the contract's largest payload (a model file) plus headers
    (edvit/limits.py): a client sending more is disconnected before the broker stores or
    forwards it; the services enforce the smaller per-topic limits.
    """
    return "\n".join(
        (
            f"listener {port} {host}",
            "allow_anonymous true",
            *COMMON_CONFIG_LINES,
        )
    )


def secure_mosquitto_config(directory: Path, host: str, port: int, user: str) -> str:
    """The mosquitto 2.x config `edvit secure init` writes to DIR/broker/mosquitto.conf: one
    TLS listener (no plain one), a client certificate signed by DIR/ca.crt required on top
    of a username and password, the ACL, and the same packet limit as the plain broker.

    `user`: mosquitto started as root drops to this user before it reads the key, password
    and ACL files, which are owner-only; `edvit secure init` makes it the files' owner
    (README, "Security"). "root" keeps root (mosquitto then changes no user).
    """
    broker = directory.resolve() / "broker"
    return "\n".join(
        (
            "# Written by `edvit secure init`; `edvit broker --secure DIR` runs it.",
            f"listener {port} {host}",
            f"certfile {broker / 'server.crt'}",
            f"keyfile {broker / 'server.key'}",
            f"cafile {directory.resolve() / 'ca.crt'}",
            "require_certificate true",
            "tls_version tlsv1.2",
            "allow_anonymous false",
            f"password_file {broker / 'passwd'}",
            f"acl_file {broker / 'acl'}",
            f"user {user}",
            *COMMON_CONFIG_LINES,
        )
    )


def with_listener(config: str, host: str, port: int) -> str:
    """A mosquitto config with its (one) `listener` line moved to host:port."""
    lines = config.splitlines()
    listeners = [i for i, line in enumerate(lines) if line.split()[:1] == ["listener"]]
    if len(listeners) != 1:
        raise BrokerError(f"expected one `listener` line in the config, found {len(listeners)}")
    lines[listeners[0]] = f"listener {port} {host}"
    return "\n".join(lines) + "\n"


def wait_for_port(host: str, port: int, deadline: float) -> bool:
    """Try a TCP connect until it succeeds or the deadline (a monotonic time) passes."""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class LocalBroker:
    """An MQTT broker child process on host:port; use as a context manager or start()/stop()."""

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        kind: KindArg = "auto",
        log_path: Path | None = None,
        secure_config: Path | None = None,
        extra_config: str | None = None,
        persistence_dir: Path | None = None,
    ) -> None:
        """`secure_config`: a config written by `edvit secure init` (TLS, logins, ACL), run
        with its listener moved to host:port; mosquitto only. `extra_config`: lines added to
        the mosquitto config, e.g. a bridge to another broker. `persistence_dir`: mosquitto
        keeps its retained messages there across restarts (written on a clean stop, and
        every second), as a production broker does; without it a restart loses them."""
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} is out of range 0-65535")
        self._host = host
        self._port = port if port else find_free_port(host)
        self._kind = resolve_kind(kind)
        if extra_config is not None and self._kind != "mosquitto":
            raise BrokerError("extra_config is a mosquitto config; install mosquitto")
        if secure_config is not None and self._kind != "mosquitto":
            raise BrokerError(
                "the embedded amqtt broker cannot run a secure config (TLS, passwords, ACL); "
                "install mosquitto"
            )
        if persistence_dir is not None and self._kind != "mosquitto":
            raise BrokerError("persistence needs mosquitto; install mosquitto")
        self._secure_config = secure_config
        self._extra_config = extra_config
        self._persistence_dir = persistence_dir
        self._log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._log_file: IO[bytes] | None = None
        self._current_log: Path | None = None

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def kind(self) -> Kind:
        return self._kind

    @property
    def url(self) -> str:
        scheme = "mqtts" if self._secure_config else "mqtt"
        return f"{scheme}://{self._host}:{self._port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout: float = 10) -> None:
        """Start the child and return once it accepts TCP connections; BrokerError if not."""
        if self.running:
            return
        if not port_is_free(self._host, self._port):
            raise BrokerError(f"cannot start broker: {self._host}:{self._port} is already in use")
        self._tmpdir = tempfile.TemporaryDirectory(prefix="edvit-broker-")
        self._current_log = self._log_path or Path(self._tmpdir.name) / "broker.log"
        self._log_file = self._current_log.open("ab")
        argv = self._command(Path(self._tmpdir.name))
        log.debug("starting %s broker: %s", self._kind, argv)
        # A session of its own: a Ctrl-C at the terminal reaches us, not the child, so the
        # child is always stopped through stop() and its escalation.
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._wait_ready(self._proc, timeout)
        except BaseException:
            self.stop()
            raise
        log.info("%s broker listening on %s", self._kind, self.url)

    def stop(self) -> int | None:
        """Stop the child (SIGINT, then SIGTERM, then SIGKILL) and release its files.

        Returns the child's exit code (0 for a clean stop), or None when none was started.
        """
        proc, self._proc = self._proc, None
        try:
            if proc is None:
                return None
            return stop_process(proc, grace_s=STOP_GRACE_S, name=f"{self._kind} broker", logger=log)
        finally:
            self._release()

    def kill(self) -> None:
        """SIGKILL the child, as a crash would; retained state in memory is lost."""
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        finally:
            self._release()

    def restart(self, timeout: float = 10, *, hard: bool = False) -> None:
        """Stop (or kill, with hard=True) and start again on the same host and port."""
        if hard:
            self.kill()
        else:
            self.stop()
        self.start(timeout)

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The end of the broker's log, for error messages."""
        if self._current_log is None or not self._current_log.exists():
            return ""
        data = self._current_log.read_bytes()[-chars:]
        return data.decode("utf-8", errors="replace")

    def _command(self, workdir: Path) -> list[str]:
        if self._kind == "mosquitto":
            binary = mosquitto_path()
            if binary is None:
                raise BrokerError("mosquitto is not installed; use kind='embedded'")
            conf = workdir / "mosquitto.conf"
            if self._secure_config is None:
                text = mosquitto_config(self._host, self._port)
            else:
                try:
                    base = self._secure_config.read_text(encoding="utf-8")
                except OSError as exc:
                    raise BrokerError(f"cannot read {self._secure_config}: {exc}") from None
                text = with_listener(base, self._host, self._port)
            if self._persistence_dir is not None:
                self._persistence_dir.mkdir(parents=True, exist_ok=True)
                # Started as root, mosquitto drops to its own user, which may not write
                # here: it stays root instead (a broker for tests and benches).
                stay_root = ("user root",) if os.geteuid() == 0 else ()
                text = text.replace("persistence false\n", "") + "\n".join((
                    *stay_root,
                    "persistence true",
                    f"persistence_location {self._persistence_dir.resolve()}/",
                    "autosave_interval 1",
                    "",
                ))  # fmt: skip
            if self._extra_config:
                text = f"{text.rstrip()}\n{self._extra_config}\n"
            conf.write_text(text, encoding="utf-8")
            return [binary, "-c", str(conf)]
        return python_module(
            "edvit.broker.embedded",
            "--host",
            self._host,
            "--port",
            str(self._port),
            "--log-level",
            "INFO",
        )

    def _wait_ready(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BrokerError(
                    f"{self._kind} broker exited with code {proc.returncode} "
                    f"before listening on {self.url}:\n{self.log_tail()}"
                )
            if wait_for_port(self._host, self._port, min(deadline, time.monotonic() + 0.5)):
                return
        raise BrokerError(
            f"{self._kind} broker did not listen on {self.url} within {timeout:g} s:\n"
            f"{self.log_tail()}"
        )

    def _release(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

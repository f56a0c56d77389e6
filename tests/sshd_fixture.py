"""An OpenSSH server on 127.0.0.1 for `ray up` tests, started and stopped by PID.

Ray's local provider has no ssh port setting, so the server listens on
127.0.0.1:22. Its host key, the client key and the authorized_keys file are
throwaway files in a temp dir. Every session it serves gets ``SetEnv`` values
(a sandbox HOME and a marker variable): that keeps `ray up` from appending to
the real ~/.bashrc of a shared machine, and lets the caller find every process
that was started through this server by its environment.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = Path("/usr/sbin/sshd")
HOST = "127.0.0.1"
PORT = 22  # Ray's SSH command runner passes no -p


class SshdError(RuntimeError):
    """The server could not be installed, started or reached."""


def ensure_installed(timeout_s: float = 300.0) -> None:
    """Install openssh-server and rsync (Ray syncs file_mounts with rsync) if absent."""
    missing = [pkg for pkg, exe in (("openssh-server", str(SSHD)), ("rsync", "rsync"))
               if shutil.which(exe) is None]
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise SshdError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def port_in_use(host: str = HOST, port: int = PORT) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True, capture_output=True, timeout=30)


@dataclass
class LoopbackSshd:
    """sshd -D on 127.0.0.1:22; use as a context manager.

    ``session_env`` is set in every session the server opens (sshd_config
    ``SetEnv``, which sshd applies after HOME/USER, so it can move HOME).
    """

    workdir: Path
    session_env: dict[str, str] = field(default_factory=dict)
    user: str = "root"
    proc: subprocess.Popen | None = None

    @property
    def client_key(self) -> Path:
        return self.workdir / "client_key"

    @property
    def log_path(self) -> Path:
        return self.workdir / "sshd.log"

    def _write_config(self) -> Path:
        host_key = self.workdir / "host_key"
        _keygen(host_key)
        _keygen(self.client_key)
        authorized = self.workdir / "authorized_keys"
        authorized.write_text((self.workdir / "client_key.pub").read_text())
        authorized.chmod(0o600)
        set_env = " ".join(f"{k}={v}" for k, v in self.session_env.items())
        lines = [
            f"ListenAddress {HOST}",
            f"Port {PORT}",
            f"HostKey {host_key}",
            f"AuthorizedKeysFile {authorized}",
            f"PidFile {self.workdir / 'sshd.pid'}",
            f"AllowUsers {self.user}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "StrictModes no",
            "UsePAM no",
            "PrintMotd no",
            "MaxStartups 50",
            "MaxSessions 50",
        ]
        if set_env:
            lines.append(f"SetEnv {set_env}")
        config = self.workdir / "sshd_config"
        config.write_text("\n".join(lines) + "\n")
        return config

    def ssh_command(self, remote_cmd: str) -> list[str]:
        return ["ssh", "-i", str(self.client_key), "-o", "IdentitiesOnly=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR",
                f"{self.user}@{HOST}", remote_cmd]

    def start(self, timeout_s: float = 20.0) -> None:
        ensure_installed()
        if port_in_use():
            raise SshdError(f"{HOST}:{PORT} is already taken; cannot start a test sshd")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation dir
        check = subprocess.run([str(SSHD), "-t", "-f", str(config)], capture_output=True, text=True)
        if check.returncode != 0:
            raise SshdError(f"sshd rejected its config: {check.stderr}")
        log = self.log_path.open("ab")
        # -D: stay in the foreground so self.proc.pid is the daemon; -e: log to stderr.
        self.proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)],
                                     stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SshdError(f"sshd exited with {self.proc.returncode}: {self.log_path.read_text()}")
            probe = subprocess.run(self.ssh_command("true"), capture_output=True, timeout=15)
            if probe.returncode == 0:
                return
            time.sleep(0.3)
        self.stop()
        raise SshdError(f"sshd did not accept a login within {timeout_s}s: {self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> "LoopbackSshd":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

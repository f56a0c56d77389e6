"""A throwaway node and client for running `ray up` on a shared machine.

`ray up` against the loopback sshd reaches the same machine other people's
tests run on, so the node side is fenced in:

* HOME is a temp dir (set by the sshd's SetEnv): the cluster YAML's
  initialization_commands append to that ~/.bashrc, not the real one, and
  ~/fluxion-venv, ~/fluxion-dist, ~/ray_bootstrap_* land there too.
* ~/fluxion-venv is an overlay venv that sees the test's venv through a .pth
  file, so the YAML's `pip install -e` installs only this project, offline.
* ~/.bashrc defines a `ray` shell function: `ray stop` (which `ray up` runs
  before starting and `ray down` runs to stop the head) stops only this
  sandbox's processes instead of every Ray on the machine; `ray start` gets
  free ports and 127.0.0.1 so it collides with nobody and stays on loopback.
* every process the sshd starts carries FLUXION_RAYUP_NODE=<token> in its
  environment, every client-side process FLUXION_RAYUP_CLIENT=<token>: the
  sweep at the end finds exactly those PIDs and kills them one by one.

`python ray_up_sandbox.py stop-node` is what that `ray stop` runs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

NODE_MARK = "FLUXION_RAYUP_NODE"
CLIENT_MARK = "FLUXION_RAYUP_CLIENT"
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
# `ray start --head` options that take a port; each gets a free one.
HEAD_PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port",
                   "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                   "--metrics-export-port", "--runtime-env-agent-port",
                   "--node-manager-port", "--object-manager-port")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # gone, or a kernel thread
        return []


def _state_and_ppid(pid: int) -> tuple[str, int]:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "X", 0
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    return _state_and_ppid(pid)[0] not in ("X", "Z")


def _ancestors(pid: int) -> set[int]:
    seen = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        pid = _state_and_ppid(pid)[1]
    return seen


def marked_pids(mark: str, token: str) -> list[int]:
    """Live processes whose environment holds mark=token, minus this one's ancestry."""
    needle = f"{mark}={token}".encode()
    mine = _ancestors(os.getpid())
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            pid = int(entry.name)
            if pid not in mine and needle in _environ(pid) and _alive(pid):
                pids.append(pid)
    return pids


def kill_pids(pids: list[int], grace_s: float = 10.0) -> list[int]:
    """SIGTERM each PID, SIGKILL what outlives the grace period; returns the ones killed hard."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    stubborn = [p for p in pids if _alive(p)]
    for pid in stubborn:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return stubborn


@dataclass(frozen=True)
class RayUpSandbox:
    """Paths and environments of one `ray up` test run under ``root``."""

    root: Path
    token: str

    @property
    def node_home(self) -> Path:
        return self.root / "node"

    @property
    def client_home(self) -> Path:
        return self.root / "client"

    @property
    def checkout(self) -> Path:
        """A copy of the repo as `ray up` would sync it: the working dir of the client."""
        return self.root / "checkout"

    @property
    def venv(self) -> Path:
        return self.node_home / "fluxion-venv"

    def build(self, repo: Path) -> None:
        for d in (self.node_home / "tmp", self.client_home / "tmp"):
            d.mkdir(parents=True, exist_ok=True)
        # The same filter the YAML gives rsync: no venv, no build outputs, no .git.
        subprocess.run(["rsync", "-a", "--filter=dir-merge,- .gitignore", "--exclude=.git",
                        f"{repo}/", f"{self.checkout}/"], check=True, timeout=120)
        self._make_overlay_venv()
        self._write_node_bashrc()
        # The YAMLs mount the launching machine's Ray token (~/.ray/auth_token) on every node.
        token = self.client_home / ".ray" / "auth_token"
        token.parent.mkdir(mode=0o700, exist_ok=True)
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)

    def cluster_yaml(self, shipped: Path, ssh_key: Path) -> Path:
        """The shipped YAML with only the ssh key swapped for this run's.

        Ray hands ssh_private_key to ssh unexpanded, and ssh expands ~ from
        the passwd entry, not $HOME: the real ~/.ssh would be used.
        """
        cfg = yaml.safe_load(shipped.read_text())
        cfg["auth"]["ssh_private_key"] = str(ssh_key)
        out = self.root / shipped.name
        out.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return out

    def session_env(self) -> dict[str, str]:
        """What the sshd sets in every session it opens."""
        return {"HOME": str(self.node_home), NODE_MARK: self.token}

    def client_env(self) -> dict[str, str]:
        """Environment of the `ray up/exec/down` client processes."""
        # A token path another test's local cluster set would override the one the YAML mounts.
        env = {k: v for k, v in os.environ.items()
               if k not in (NODE_MARK, "RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
        tmp = str(self.client_home / "tmp")
        env.update(RAY_ENV, HOME=str(self.client_home), RAY_TMPDIR=tmp, TMPDIR=tmp,
                   **{CLIENT_MARK: self.token})
        return env

    def node_processes(self) -> list[int]:
        return marked_pids(NODE_MARK, self.token)

    def sweep(self) -> list[int]:
        """Kill every process this run started, node side and client side; returns their PIDs."""
        pids = marked_pids(NODE_MARK, self.token) + marked_pids(CLIENT_MARK, self.token)
        kill_pids(pids)
        return pids

    def _make_overlay_venv(self) -> None:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(self.venv)],
                       check=True, timeout=120)
        py = f"python{sys.version_info.major}.{sys.version_info.minor}"
        shared = sysconfig.get_paths()["purelib"]
        # Sorted after setuptools' __editable__ files, so this checkout's
        # editable install wins over one in the shared venv.
        pth = self.venv / "lib" / py / "site-packages" / "zz_fluxion_shared_site.pth"
        pth.write_text(f"import site; site.addsitedir({shared!r})\n")
        ray = self.venv / "bin" / "ray"
        ray.write_text(f"#!{self.venv / 'bin' / 'python'}\nimport sys\n"
                       "from ray.scripts.scripts import main\nsys.exit(main())\n")
        ray.chmod(0o755)

    def _write_node_bashrc(self) -> None:
        ports = free_ports(len(HEAD_PORT_FLAGS))
        head_flags = " ".join(f"{flag}={port}" for flag, port in zip(HEAD_PORT_FLAGS, ports, strict=True))
        stop = f"{shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).resolve()))} stop-node"
        exports = {**RAY_ENV, "RAY_TMPDIR": str(self.node_home / "tmp"),
                   # The overlay venv sees every dependency already; nothing to fetch.
                   "PIP_NO_INDEX": "1", "PIP_NO_DEPS": "1",
                   # pip reads --no-* switches from the environment inverted: 0 means "no isolation".
                   "PIP_NO_BUILD_ISOLATION": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        lines = ["# ray up test sandbox (tests/ray_up_sandbox.py); sourced more than once"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in exports.items()]
        lines += [
            "ray() {",
            '  case "$1" in',
            f"    stop) {stop} ;;",
            '    start) shift; case " $* " in',
            f'      *" --head "*) command ray start "$@" --node-ip-address=127.0.0.1 {head_flags} ;;',
            '      *) command ray start "$@" --node-ip-address=127.0.0.1 ;;',
            "    esac ;;",
            '    *) command ray "$@" ;;',
            "  esac",
            "}",
        ]
        (self.node_home / ".bashrc").write_text("\n".join(lines) + "\n")


def _stop_node() -> int:
    token = os.environ.get(NODE_MARK)
    if not token:
        print(f"stop-node: {NODE_MARK} is not set; refusing to guess what to stop", file=sys.stderr)
        return 2
    pids = marked_pids(NODE_MARK, token)
    stubborn = kill_pids(pids)
    print(f"sandbox ray stop: stopped {len(pids)} processes ({len(stubborn)} with SIGKILL)")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["stop-node"]:
        sys.exit(f"usage: {sys.argv[0]} stop-node")
    sys.exit(_stop_node())

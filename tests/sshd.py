"""A private OpenSSH sshd on 127.0.0.1 with throw-away keys, for tests.

Its own host key, client key, known_hosts
and ssh config; never touches the real ~/.ssh.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


@dataclass
class Sshd:
    dir: Path
    port: int
    alias: str
    ssh_config: Path
    known_hosts: Path
    client_key: Path
    host_root: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def host_key_line(self) -> str:
        key_type, key_b64 = (self.dir / "host_ed25519.pub").read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {key_type} {key_b64}\n"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [SSHD, "-D", "-f", str(self.dir / "sshd_config"), "-E", str(self.log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sshd did not start; see {self.log}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def add_env(self, variables: dict[str, str]) -> None:
        """Add variables to what the agent's sessions get (the ``SetEnv`` line); before ``start``.

        sshd honours only its first SetEnv line, so ``make_sshd(extra_config=...)`` cannot add one.
        """
        config = self.dir / "sshd_config"
        extra = " ".join(f"{name}={value}" for name, value in variables.items())
        lines = config.read_text().splitlines(keepends=True)
        index = next(i for i, line in enumerate(lines) if line.startswith("SetEnv "))
        lines[index] = lines[index].rstrip("\n") + f" {extra}\n"
        config.write_text("".join(lines))

    def connection_processes(self) -> list[int]:
        """The per-connection sshd processes (and what runs under them), not the listener."""
        if self.process is None:
            return []
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
        found, todo = [], list(children.get(self.process.pid, []))
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += children.get(pid, [])
        return found

    def drop_connections(self) -> int:
        """Kill every open SSH connection, as a dropped network link would end them."""
        pids = self.connection_processes()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def restart(self, down_seconds: float = 1.5) -> None:
        self.drop_connections()
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def accepted_logins(self) -> int:
        return self.log.read_text().count("Accepted publickey") if self.log.exists() else 0

    def sessions_started(self) -> list[str]:
        """The log's "Starting session: command ..." lines: what ran here (needs ``LogLevel VERBOSE``)."""
        if not self.log.exists():
            return []
        return [line for line in self.log.read_text().splitlines() if "Starting session:" in line]

    def write_client_config(self, path: Path, alias: str, **overrides: str) -> Path:
        """An ssh config with one Host block; ``overrides`` replace its options."""
        options = {
            "HostName": "127.0.0.1",
            "Port": str(self.port),
            "User": "root",
            "IdentityFile": str(self.client_key),
            "IdentitiesOnly": "yes",
            "UserKnownHostsFile": str(self.known_hosts),
        } | overrides
        body = "".join(f"  {k} {v}\n" for k, v in options.items())
        path.write_text(f"Host {alias}\n{body}")
        return path


def make_sshd(base: Path, alias: str = "testhost", extra_config: str = "") -> Sshd:
    """A configured, not yet started sshd; ``extra_config`` adds sshd_config lines (e.g. ``LogLevel VERBOSE``).

    sshd keeps the first value of an option, so extra lines add options and cannot override the ones below.
    """
    if not os.path.exists(SSHD):
        raise RuntimeError("OpenSSH sshd is missing: apt-get install -y openssh-server (.ci/run does this)")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o700)
    keygen(base / "host_ed25519")
    keygen(base / "client_ed25519")
    shutil.copy(base / "client_ed25519.pub", base / "authorized_keys")
    port = free_port()
    host_root = base / "hostroot"
    (base / "sshd_config").write_text(
        f"Port {port}\n"
        "ListenAddress 127.0.0.1\n"
        f"HostKey {base / 'host_ed25519'}\n"
        f"PidFile {base / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {base / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "StrictModes no\n"
        "AllowTcpForwarding yes\n"
        f"SetEnv REMOTE_MAGIC_ROOT={host_root} REMOTE_MAGIC_WARM_IDLE=120\n"
        "Subsystem sftp /usr/lib/openssh/sftp-server\n" + (extra_config.rstrip("\n") + "\n" if extra_config else "")
    )
    sshd = Sshd(
        dir=base,
        port=port,
        alias=alias,
        ssh_config=base / "ssh_config",
        known_hosts=base / "known_hosts",
        client_key=base / "client_ed25519",
        host_root=host_root,
        log=base / "sshd.log",
    )
    sshd.known_hosts.write_text(sshd.host_key_line())
    sshd.write_client_config(sshd.ssh_config, alias)
    return sshd

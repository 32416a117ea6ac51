"""SSH hosts through paramiko, configured like OpenSSH.

Reads ``~/.ssh/config`` (HostName, User, Port, IdentityFile, IdentitiesOnly,
UserKnownHostsFile, ProxyJump), uses ssh-agent and the default keys, and
verifies host keys against known_hosts.  An unknown, changed or revoked key
is an error that says how to check and accept it; nothing is ever added to
known_hosts automatically.  One connection per host is kept and reused; each
command is a new channel on it (a few ms on an open connection).
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import os
import shlex
import threading
from dataclasses import dataclass, field
from typing import Any

import paramiko

from ..errors import AuthenticationError, ConnectionFailed, HostKeyError
from .base import CommandResult, Pipe, StdinData, Transport
from .openssh import Hop, PinnedSSH, find_ssh
from .process import spawn_process

DEFAULT_SSH_CONFIG = os.path.join("~", ".ssh", "config")
DEFAULT_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
DEFAULT_KEYS = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
CONNECT_TIMEOUT = 15.0
KEEPALIVE_SECONDS = 15
_READ_SIZE = 4 * 1024 * 1024
# Measured on a 2-core test VM against OpenSSH: AES-GCM is 25-60% faster than paramiko's default aes128-ctr for
# uploads, and a large channel window keeps exec-channel downloads near scp speed.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
WINDOW_SIZE = 2**27
MAX_PACKET_SIZE = 2**18  # 256 KiB packets: 8x fewer per-packet Python steps in paramiko than its default

# paramiko rekeys itself every 2**29 bytes/packets and a long exec download can hang in that rekey
# (paramiko issue 822: stalled at ~511 MiB, then "Key-exchange timed out"). Leave rekeying to the
# server, whose OpenSSH RekeyLimit defaults are safe for AES-GCM.
paramiko.packet.Packetizer.REKEY_BYTES = 2**60
paramiko.packet.Packetizer.REKEY_PACKETS = 2**60


@dataclass
class SSHTarget:
    """Where and how to connect, as OpenSSH would resolve it."""

    name: str
    hostname: str
    port: int
    user: str
    identity_files: list[str] = field(default_factory=list)
    identities_only: bool = False
    known_hosts_files: list[str] = field(default_factory=list)
    proxy_jump: list[str] = field(default_factory=list)

    @property
    def known_hosts_name(self) -> str:
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"


def load_ssh_config(path: str | None) -> paramiko.SSHConfig:
    path = os.path.expanduser(path or DEFAULT_SSH_CONFIG)
    if os.path.exists(path):
        return paramiko.SSHConfig.from_path(path)
    return paramiko.SSHConfig()


def resolve_target(host: str, config: paramiko.SSHConfig) -> SSHTarget:
    """``alias``, ``host``, ``user@host`` or ``user@host:port`` -> an SSHTarget."""
    user, _, rest = host.rpartition("@")
    name, port = rest, None
    if rest.count(":") == 1:
        name, port_text = rest.split(":")
        if not port_text.isdigit():
            raise ConnectionFailed(f"bad port in host {host!r}; write it as user@host:PORT")
        port = int(port_text)
    options = config.lookup(name)
    known_hosts = options.get("userknownhostsfile")
    jump = options.get("proxyjump")
    return SSHTarget(
        name=name,
        hostname=options.get("hostname", name),
        port=port or int(options.get("port", 22)),
        user=user or options.get("user") or getpass.getuser(),
        identity_files=[os.path.expanduser(p) for p in options.get("identityfile", [])],
        identities_only=options.get("identitiesonly", "no").lower() == "yes",
        known_hosts_files=[
            os.path.expanduser(p) for p in (known_hosts.split() if known_hosts else DEFAULT_KNOWN_HOSTS)
        ],
        proxy_jump=[] if not jump or jump.lower() == "none" else jump.split(","),
    )


def _tuned_transport(sock: Any, **kwargs: Any) -> paramiko.Transport:
    """A paramiko Transport with a big window and AES-GCM first, when the server offers it."""
    transport = paramiko.Transport(
        sock, default_window_size=WINDOW_SIZE, default_max_packet_size=MAX_PACKET_SIZE, **kwargs
    )
    options = transport.get_security_options()
    options.ciphers = tuple(c for c in PREFERRED_CIPHERS if c in options.ciphers) + tuple(
        c for c in options.ciphers if c not in PREFERRED_CIPHERS
    )
    return transport


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint, as `ssh` prints it when asking to trust a key."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


@dataclass
class KnownHosts:
    """known_hosts as OpenSSH reads it, split into what paramiko can check and what it cannot.

    paramiko's own loader raises on ``@cert-authority`` and ``@revoked`` lines and would silently drop a
    revoked key it could not parse; here revocation is kept apart so that it always wins.
    """

    keys: paramiko.HostKeys = field(default_factory=paramiko.HostKeys)
    revoked: set[bytes] = field(default_factory=set)  # key blobs, as the server sends them
    cert_authority_lines: list[str] = field(default_factory=list)  # "path:line", for the error message
    skipped_lines: list[str] = field(default_factory=list)  # malformed or unknown lines, "path:line"

    def is_revoked(self, key: paramiko.PKey) -> bool:
        return key.asbytes() in self.revoked


def _parse_key(key_type: str, key_b64: str) -> paramiko.PKey | None:
    """A plain line's key, or None for a line paramiko cannot use (it raises many kinds of errors)."""
    try:
        return paramiko.PKey.from_type_string(key_type, base64.b64decode(key_b64, validate=True))
    except Exception:  # noqa: BLE001 - a bad line is skipped, as OpenSSH skips it
        return None


def load_known_hosts(paths: list[str], keys: paramiko.HostKeys | None = None) -> KnownHosts:
    """Read known_hosts files line by line: plain keys, ``@revoked`` keys, ``@cert-authority`` lines skipped.

    A revoked key is refused for every host, whatever the line's host patterns say: a revoked key is a
    leaked key, and leaving a plain line for it in place must not make it trusted again.
    """
    known = KnownHosts(keys=paramiko.HostKeys() if keys is None else keys)
    plain: list[tuple[list[str], str, str]] = []
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            continue
        except OSError as exc:
            # Skipping it could skip a @revoked line.
            raise HostKeyError(
                f"cannot read the known_hosts file {path}: {exc.strerror or exc}. Nothing was sent. "
                "Make it a readable file (check its permissions), or point UserKnownHostsFile in your ssh config at one."
            ) from None
        for lineno, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            where = f"{path}:{lineno}"
            marker = fields.pop(0) if fields[0].startswith("@") else None
            if len(fields) < 3 or marker not in (None, "@revoked", "@cert-authority"):
                known.skipped_lines.append(where)
            elif marker == "@cert-authority":
                known.cert_authority_lines.append(where)
            elif marker == "@revoked":
                try:
                    known.revoked.add(base64.b64decode(fields[2], validate=True))
                except (binascii.Error, ValueError):
                    known.skipped_lines.append(where)
            else:
                plain.append((fields[0].split(","), fields[1], fields[2]))
    for hostnames, key_type, key_b64 in plain:
        key = _parse_key(key_type, key_b64)
        if key is None or known.is_revoked(key):
            continue
        for hostname in hostnames:
            existing = known.keys.lookup(hostname)
            if existing is None or key.get_name() not in existing:  # the first line wins, as in paramiko
                known.keys.add(hostname, key.get_name(), key)
    return known


def _revoked_error(target: SSHTarget, key: paramiko.PKey) -> HostKeyError:
    return HostKeyError(
        f"host {target.name} ({target.known_hosts_name}) offered the {key.get_name()} key {fingerprint(key)}, "
        f"which known_hosts ({', '.join(target.known_hosts_files)}) marks @revoked. Nothing was sent. "
        "A revoked key must never be trusted: it may have leaked, and someone may be intercepting the connection. "
        "Ask the host's administrator to replace that key; then remove the old one with "
        f"`ssh-keygen -R '{target.known_hosts_name}'` and run `ssh {target.name}` to check and accept the new one."
    )


class _RefuseUnknownHost(paramiko.MissingHostKeyPolicy):
    def __init__(self, target: SSHTarget, known: KnownHosts) -> None:
        self.target = target
        self.known = known

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        t = self.target
        if self.known.is_revoked(key):
            raise _revoked_error(t, key)
        message = (
            f"host {t.name} ({t.known_hosts_name}) is not in known_hosts ({', '.join(t.known_hosts_files)}); "
            f"it offered the {key.get_name()} key {fingerprint(key)}. Nothing was sent. "
        )
        if not self.known.cert_authority_lines:
            raise HostKeyError(
                message
                + f"Run `ssh {t.name}` once in a terminal to check that fingerprint and accept the key, then re-run."
            )
        # `ssh` would trust the host through its certificate and add nothing, so that advice would not help.
        keyscan = f"ssh-keyscan -t {key.get_name()} -p {t.port} {t.hostname}"
        raise HostKeyError(
            message + "known_hosts trusts hosts through @cert-authority lines "
            f"({', '.join(self.known.cert_authority_lines)}), which remote_magic does not support "
            "(paramiko cannot check host certificates). Add the host's own key line instead: check that "
            f"`{keyscan} | ssh-keygen -lf -` prints {fingerprint(key)}, then append the output of `{keyscan}` "
            f"to {t.known_hosts_files[0] if t.known_hosts_files else '~/.ssh/known_hosts'} and re-run."
        )


def _why(exc: BaseException) -> str:
    """The reason, as ssh says it: "Connection refused" rather than paramiko's "[Errno None] Unable to connect"."""
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        reasons = {error.strerror or str(error) for error in exc.errors.values()}
        return ", ".join(sorted(reasons))
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class SSHTransport(Transport):
    def __init__(
        self,
        host: str,
        python: str = "python3",
        root: str | None = None,
        ssh_config: str | None = None,
        bulk_ssh: str | None = "ssh",
    ):
        super().__init__(host, python, root)
        self.config = load_ssh_config(ssh_config)
        self.ssh_config_path = os.path.expanduser(ssh_config or DEFAULT_SSH_CONFIG)
        self.target = resolve_target(host, self.config)
        self.bulk_ssh = bulk_ssh  # the OpenSSH client for large blobs (a name on PATH, a path), or None: paramiko only
        self._pinned: PinnedSSH | None = None
        self._clients: list[paramiko.SSHClient] = []  # jump hosts first, the target last
        self._lock = threading.Lock()

    # ---- connection
    def _way(self) -> list[SSHTarget]:
        """The jump hosts (ProxyJump), then the target."""
        return [resolve_target(jump, self.config) for jump in self.target.proxy_jump] + [self.target]

    def _transport(self) -> paramiko.Transport:
        with self._lock:
            if self._clients:
                transport = self._clients[-1].get_transport()
                if transport is not None and transport.is_active():
                    return transport
                self._close_clients()
            # Build the chain aside and publish it only whole: a jump host left in self._clients after the
            # target failed would be taken for the target by the next call, and get the cell's code and data.
            hops = self._way()
            chain: list[paramiko.SSHClient] = []
            try:
                for i, hop in enumerate(hops):
                    sock = self._forward(chain[-1], hops[i - 1], hop) if chain else None
                    chain.append(self._connect(hop, sock))
                transport = chain[-1].get_transport()
                if transport is None or not transport.is_active():
                    raise ConnectionFailed(f"host {self.target.name} closed the connection right after login")
                transport.set_keepalive(KEEPALIVE_SECONDS)
            except BaseException:
                for client in reversed(chain):
                    client.close()
                raise
            self._clients = chain
            return transport

    @staticmethod
    def _forward(via: paramiko.SSHClient, jump: SSHTarget, hop: SSHTarget) -> paramiko.Channel:
        """A tunnel through the jump host to the next hop, as ``ssh -J`` opens it."""
        transport = via.get_transport()
        try:
            if transport is None:
                raise paramiko.SSHException("the connection to the jump host closed")
            return transport.open_channel(
                "direct-tcpip", (hop.hostname, hop.port), ("127.0.0.1", 0), timeout=CONNECT_TIMEOUT
            )
        except (OSError, paramiko.SSHException, EOFError) as exc:
            reason = exc.text if isinstance(exc, paramiko.ChannelException) else str(exc)
            raise ConnectionFailed(
                f"jump host {jump.name} could not reach host {hop.name} ({hop.hostname} port {hop.port}): {reason}. "
                f"Nothing was sent to {hop.name}. Check the HostName and Port of {hop.name} in your ssh config, "
                f"that sshd runs there, and that `ssh {hop.name}` works"
            ) from None

    def _connect(self, target: SSHTarget, sock: Any) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        known = load_known_hosts(target.known_hosts_files, client.get_host_keys())
        client.set_missing_host_key_policy(_RefuseUnknownHost(target, known))
        try:
            client.connect(
                target.hostname,
                port=target.port,
                username=target.user,
                key_filename=target.identity_files or None,
                allow_agent=not target.identities_only,
                look_for_keys=not target.identities_only,
                sock=sock,
                timeout=CONNECT_TIMEOUT,
                banner_timeout=CONNECT_TIMEOUT,
                auth_timeout=CONNECT_TIMEOUT,
                transport_factory=_tuned_transport,
            )
        except HostKeyError:
            client.close()
            raise
        except paramiko.BadHostKeyException as exc:
            client.close()
            if known.is_revoked(exc.key):
                raise _revoked_error(target, exc.key) from None
            raise HostKeyError(
                f"the key of host {target.name} ({target.known_hosts_name}) does not match known_hosts: it offered "
                f"{fingerprint(exc.key)}, known_hosts has {fingerprint(exc.expected_key)}. This can mean someone is "
                "intercepting the connection; nothing was sent. If the host was reinstalled, remove the old key with "
                f"`ssh-keygen -R '{target.known_hosts_name}'` and run `ssh {target.name}` to check and accept the new one."
            ) from None
        except paramiko.AuthenticationException:
            client.close()
            raise AuthenticationError(
                f"host {target.name} refused to log in {target.user}@{target.hostname} (port {target.port}) "
                f"with {self._keys_tried(target)}; check that `ssh {target.name}` logs in without a password "
                "(add your public key to ~/.ssh/authorized_keys there, or set IdentityFile in ~/.ssh/config)"
            ) from None
        except (OSError, paramiko.SSHException, EOFError) as exc:
            client.close()
            raise ConnectionFailed(
                f"cannot connect to host {target.name} ({target.hostname} port {target.port}): {_why(exc)}; "
                f"check the name and port in your ssh config and that `ssh {target.name}` works"
            ) from None
        transport = client.get_transport()
        if transport is not None and known.is_revoked(transport.get_remote_server_key()):
            # Revoked keys never reach paramiko's table, so this is a second lock on the same door.
            client.close()
            raise _revoked_error(target, transport.get_remote_server_key())
        return client

    @staticmethod
    def _keys_tried(target: SSHTarget) -> str:
        keys = list(target.identity_files)
        if not target.identities_only:
            keys += [p for p in map(os.path.expanduser, DEFAULT_KEYS) if os.path.exists(p) and p not in keys]
            if os.environ.get("SSH_AUTH_SOCK"):
                keys.append("the keys in ssh-agent")
        return "keys " + ", ".join(keys) if keys else "no keys at all (no IdentityFile, no ~/.ssh/id_*, no ssh-agent)"

    def _close_clients(self) -> None:
        for client in reversed(self._clients):
            client.close()
        self._clients = []

    def close(self) -> None:
        super().close()
        with self._lock:
            self._close_clients()
            if self._pinned is not None:
                self._pinned.close()
                self._pinned = None

    def is_alive(self) -> bool:
        transport = self._clients[-1].get_transport() if self._clients else None
        return transport is not None and transport.is_active()

    def _open_channel(self, argv: list[str]) -> paramiko.Channel:
        try:
            channel = self._transport().open_session()
            channel.exec_command(shlex.join(argv))
        except (OSError, paramiko.SSHException, EOFError) as exc:
            self.close()
            raise ConnectionFailed(f"lost the connection to host {self.host}: {exc}") from None
        return channel

    def _exit_status(self, channel: paramiko.Channel) -> int | None:
        """The command's exit status, or None when the link died before it was sent.

        paramiko reports -1 for a channel closed without an exit status.
        """
        if not channel.exit_status_ready() and not self.is_alive():
            return None
        status = channel.recv_exit_status()
        return None if status == -1 else status

    # ---- commands
    def execute(self, argv: list[str], stdin: StdinData = None) -> CommandResult:
        channel = self._open_channel(argv)
        try:
            if stdin is not None:
                for part in [stdin] if isinstance(stdin, bytes) else stdin:
                    view = memoryview(part)  # sendall(bytes) would copy the rest per packet
                    channel.sendall(view)
                    self.bytes_sent += view.nbytes
            channel.shutdown_write()
            stdout = _read_all(channel.makefile("rb"))
            stderr = _read_all(channel.makefile_stderr("rb"))
            self.bytes_received += len(stdout)
            returncode = self._exit_status(channel)
            if returncode is None:
                raise ConnectionFailed(f"lost the connection to host {self.host} while running a command")
            return CommandResult(returncode, stdout, stderr)
        except (OSError, paramiko.SSHException, EOFError) as exc:
            self.close()
            raise ConnectionFailed(f"lost the connection to host {self.host}: {exc}") from None
        finally:
            channel.close()

    def spawn(self, argv: list[str]) -> Pipe:
        return _ChannelPipe(self._open_channel(argv))

    @property
    def has_bulk_path(self) -> bool:
        return find_ssh(self.bulk_ssh) is not None

    def spawn_bulk(self, argv: list[str]) -> Pipe | None:
        """``argv`` started through the OpenSSH client, through the same jump hosts, each hop pinned to the host
        key paramiko verified; None where there is no ``ssh`` (or ``bulk_ssh`` is off)."""
        ssh = find_ssh(self.bulk_ssh)
        if ssh is None:
            return None
        self._transport()  # connects (and verifies every hop) first when needed
        targets = self._way()
        with self._lock:
            transports = [client.get_transport() for client in self._clients]
            if len(transports) != len(targets) or any(t is None for t in transports):
                raise ConnectionFailed(f"lost the connection to host {self.host} while starting the bulk path")
            keys = [t.get_remote_server_key() for t in transports if t is not None]
            hops = [
                Hop(t.name, t.hostname, t.port, t.user, t.identity_files, t.identities_only, key)
                for t, key in zip(targets, keys, strict=True)
            ]
            if self._pinned is None:
                self._pinned = PinnedSSH(ssh, self.ssh_config_path)
            self._pinned.pin(hops)
            return spawn_process(self._pinned.argv(argv))

    def bulk_refusal(self, stderr: bytes) -> Exception | None:
        """Why the bulk path's ``ssh`` ended, when it must stop the transfer (a host key other than the verified one)."""
        return self._pinned.refusal(stderr) if self._pinned is not None else None


class _ChannelPipe:
    """An exec channel as the stdin/stdout of the process it runs."""

    def __init__(self, channel: paramiko.Channel) -> None:
        self.channel = channel

    def write(self, data: bytes | memoryview) -> None:
        self.channel.sendall(data)

    def read(self, size: int) -> bytes:
        return self.channel.recv(min(size, _READ_SIZE))

    def close(self) -> None:
        self.channel.close()

    def exit_status(self) -> int | None:
        # The exit status message may trail the end of the output a little.
        if not self.channel.status_event.wait(2):
            return None
        status = self.channel.recv_exit_status()
        return None if status == -1 else status

    def stderr(self) -> bytes:
        parts = []
        while self.channel.recv_stderr_ready():
            parts.append(self.channel.recv_stderr(65536))
        return b"".join(parts)


def _read_all(stream: Any) -> bytes:
    parts = []
    while chunk := stream.read(_READ_SIZE):
        parts.append(chunk)
    return b"".join(parts)

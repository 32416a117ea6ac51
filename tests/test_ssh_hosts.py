"""SSH host trust and ProxyJump chains, against real sshd processes on 127.0.0.1.

A refusal must leave nothing half open that a later call could mistake for the host, and
known_hosts is read as OpenSSH writes it: markers included, revocation always wins.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sshd import Sshd, keygen, make_sshd

from remote_magic.errors import AuthenticationError, ConnectionFailed, HostKeyError
from remote_magic.transport import SSHTransport


def _public_key(path: Path) -> str:
    """``TYPE BASE64`` of a fresh key pair, as a known_hosts line carries it."""
    keygen(path)
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


def _wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ---- ProxyJump: a failed target must not leave the jump host behind as "the connection"


@pytest.fixture
def jump_and_target(tmp_path: Path) -> Iterator[tuple[Sshd, Sshd]]:
    """A bastion and the host behind it, each its own sshd that logs every session it starts."""
    jump = make_sshd(tmp_path / "jump", alias="jumpalias", extra_config="LogLevel VERBOSE")
    target = make_sshd(tmp_path / "target", alias="target", extra_config="LogLevel VERBOSE")
    try:
        jump.start()
        target.start()
        yield jump, target
    finally:
        target.stop()
        jump.stop()


def _chain_config(tmp_path: Path, jump: Sshd, target: Sshd, known_hosts: str) -> Path:
    """A client ssh config: ``target`` reached through ``ProxyJump jumpalias``, one known_hosts for both."""
    known_hosts_file = tmp_path / "client_known_hosts"
    known_hosts_file.write_text(known_hosts)
    blocks = [
        target.write_client_config(
            tmp_path / "target_block", "target", UserKnownHostsFile=str(known_hosts_file), ProxyJump="jumpalias"
        ),
        jump.write_client_config(tmp_path / "jump_block", "jumpalias", UserKnownHostsFile=str(known_hosts_file)),
    ]
    config = tmp_path / "client_config"
    config.write_text("".join(block.read_text() for block in blocks))
    return config


def test_proxyjump_runs_commands_on_the_target_only(jump_and_target: tuple[Sshd, Sshd], tmp_path: Path) -> None:
    jump, target = jump_and_target
    config = _chain_config(tmp_path, jump, target, jump.host_key_line() + target.host_key_line())
    transport = SSHTransport("target", python=sys.executable, ssh_config=str(config))
    try:
        assert transport.execute(["echo", "hi"]).stdout == b"hi\n"
    finally:
        transport.close()
    assert len(target.sessions_started()) == 1
    assert jump.sessions_started() == []  # the bastion only forwarded


@pytest.mark.parametrize("failure", ["unknown key", "changed key", "refused login", "target down"])
def test_failed_target_behind_a_jump_host_never_falls_back_to_the_jump_host(
    jump_and_target: tuple[Sshd, Sshd], tmp_path: Path, failure: str
) -> None:
    jump, target = jump_and_target
    known_hosts = jump.host_key_line() + target.host_key_line()
    error: type[Exception] = HostKeyError
    message = r"host target .*is not in known_hosts.*Nothing was sent"
    if failure == "unknown key":
        known_hosts = jump.host_key_line()
    elif failure == "changed key":
        known_hosts = jump.host_key_line() + f"[127.0.0.1]:{target.port} {_public_key(tmp_path / 'impostor')}\n"
        message = r"key of host target .*does not match known_hosts"
    elif failure == "refused login":
        (target.dir / "authorized_keys").write_text("")
        error, message = AuthenticationError, "host target refused to log in"
    else:
        target.stop()
        error, message = ConnectionFailed, r"jump host jumpalias could not reach host target.*Nothing was sent"
    config = _chain_config(tmp_path, jump, target, known_hosts)
    transport = SSHTransport("target", python=sys.executable, ssh_config=str(config))
    try:
        for attempt in (1, 2):  # re-running the cell must be refused again, not sent to the bastion
            with pytest.raises(error, match=message):
                transport.execute(["echo", "hi"])
            assert jump.sessions_started() == []
            assert jump.accepted_logins() == attempt
        assert not transport.is_alive()
        # The failure itself closed the half-built chain: no connection to the bastion stays open.
        assert _wait_until(lambda: not jump.connection_processes()), "the jump host connection was left open"
    finally:
        transport.close()
    assert jump.sessions_started() == []
    assert target.sessions_started() == []


# ---- known_hosts markers: @cert-authority skipped, @revoked always refused, bad lines skipped


def _ssh_transport(sshd: Sshd, tmp_path: Path, known_hosts: str | bytes) -> tuple[SSHTransport, Path]:
    known_hosts_file = tmp_path / "known_hosts"
    if isinstance(known_hosts, bytes):
        known_hosts_file.write_bytes(known_hosts)
    else:
        known_hosts_file.write_text(known_hosts)
    config = sshd.write_client_config(tmp_path / "config", "marked", UserKnownHostsFile=str(known_hosts_file))
    return SSHTransport("marked", python=sys.executable, ssh_config=str(config)), known_hosts_file


def _echo(transport: SSHTransport) -> bytes:
    try:
        return transport.execute(["echo", "hi"]).stdout
    finally:
        transport.close()


def _host_key(sshd: Sshd) -> str:
    return sshd.host_key_line().split(maxsplit=1)[1].strip()


@pytest.mark.parametrize("pattern", ["*.example.org", "*"])
def test_cert_authority_line_is_skipped_and_the_plain_key_still_works(sshd: Sshd, tmp_path: Path, pattern: str) -> None:
    ca = _public_key(tmp_path / "ca")
    transport, _ = _ssh_transport(sshd, tmp_path, f"@cert-authority {pattern} {ca}\n" + sshd.host_key_line())
    assert _echo(transport) == b"hi\n"


def test_host_known_only_through_a_cert_authority_is_refused_with_how_to_add_its_key(
    sshd: Sshd, tmp_path: Path
) -> None:
    ca_line = f"@cert-authority * {_public_key(tmp_path / 'ca')}\n"
    transport, known_hosts = _ssh_transport(sshd, tmp_path, ca_line)
    logins = sshd.accepted_logins()
    with pytest.raises(HostKeyError) as caught:
        _echo(transport)
    text = str(caught.value)
    assert "is not in known_hosts" in text and "Nothing was sent" in text
    assert f"@cert-authority lines ({known_hosts}:1)" in text and "does not support" in text
    assert f"ssh-keyscan -t ssh-ed25519 -p {sshd.port} 127.0.0.1" in text and "SHA256:" in text
    assert known_hosts.read_text() == ca_line
    assert sshd.accepted_logins() == logins


def _hashed(line: str, tmp_path: Path) -> str:
    """``line`` with its host name hashed, as ``ssh-keygen -H`` (HashKnownHosts) writes it."""
    path = tmp_path / "to_hash"
    path.write_text(line)
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(path)], check=True, capture_output=True)
    hashed = path.read_text()
    assert hashed.startswith("|1|")
    return hashed


REVOKED_LAYOUTS = [
    "revoked, then plain",
    "plain, then revoked",
    "revoked only",
    "revoked, then hashed plain",
    "revoked for another host name",
    "revoked, another key type listed",
]


@pytest.mark.parametrize("layout", REVOKED_LAYOUTS)
def test_revoked_host_key_is_refused_even_when_also_listed_plainly(sshd: Sshd, tmp_path: Path, layout: str) -> None:
    key, plain = _host_key(sshd), sshd.host_key_line()
    known_hosts = {
        "revoked, then plain": f"@revoked * {key}\n{plain}",
        "plain, then revoked": f"{plain}@revoked * {key}\n",
        "revoked only": f"@revoked * {key}\n",
        "revoked, then hashed plain": f"@revoked * {key}\n" + _hashed(plain, tmp_path),
        "revoked for another host name": f"@revoked other.example.org {key}\n{plain}",
        "revoked, another key type listed": f"@revoked [127.0.0.1]:{sshd.port} {key}\n"
        f"[127.0.0.1]:{sshd.port} ecdsa-sha2-nistp256 {_ecdsa_key(tmp_path)}\n",
    }[layout]
    transport, _ = _ssh_transport(sshd, tmp_path, known_hosts)
    logins = sshd.accepted_logins()
    with pytest.raises(HostKeyError, match=r"marks @revoked\. Nothing was sent") as caught:
        _echo(transport)
    assert "host marked ([127.0.0.1]" in str(caught.value) and "SHA256:" in str(caught.value)
    assert sshd.accepted_logins() == logins  # refused before logging in


def _ecdsa_key(tmp_path: Path) -> str:
    path = tmp_path / "ecdsa"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().split()[1]


def test_hashed_host_names_still_work(sshd: Sshd, tmp_path: Path) -> None:
    ca = f"@cert-authority *.example.org {_public_key(tmp_path / 'ca')}\n"
    transport, _ = _ssh_transport(sshd, tmp_path, ca + _hashed(sshd.host_key_line(), tmp_path))
    assert _echo(transport) == b"hi\n"


def test_malformed_known_hosts_lines_are_skipped(sshd: Sshd, tmp_path: Path) -> None:
    host = f"[127.0.0.1]:{sshd.port}"
    garbage = (
        "garbage\n"
        "foo bar baz\n"
        f"{host} ssh-ed25519 !!!not-base64!!!\n"
        f"{host} ssh-ed25519 AAAA\n"
        f"{host} ssh-unknown-type AAAAC3NzaC1lZDI1NTE5\n"
        f"@frobnicate * {_host_key(sshd)}\n"
        "@revoked\n"
        "@revoked * ssh-ed25519 !!!\n"
        "@cert-authority *.example.org\n"
        "# a comment\n"
        "\n"
        "   \t \n"
    ).encode() + b"\x80\xff\xfe not utf-8 at all\n"
    transport, _ = _ssh_transport(sshd, tmp_path, garbage + b"  " + sshd.host_key_line().encode())
    assert _echo(transport) == b"hi\n"


def test_unreadable_known_hosts_is_a_host_key_error(sshd: Sshd, tmp_path: Path) -> None:
    folder = tmp_path / "a_folder"
    folder.mkdir()
    config = sshd.write_client_config(tmp_path / "config", "folder", UserKnownHostsFile=str(folder))
    with pytest.raises(HostKeyError, match=r"cannot read the known_hosts file .*Nothing was sent"):
        _echo(SSHTransport("folder", python=sys.executable, ssh_config=str(config)))

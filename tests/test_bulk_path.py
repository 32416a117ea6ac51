"""Large blobs through the system's OpenSSH client, pinned to the host key paramiko verified.

Real parts: sshd on 127.0.0.1 with throw-away keys, the system ``ssh``, the IPython shell.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import PYTHON, run
from sshd import Sshd, make_sshd

from remote_magic.errors import HostKeyError
from remote_magic.transport.openssh import sweep_stale_pin_folders
from remote_magic.wire.client import BULK_MIN_BYTES

ALIAS = "bulkhost"
BIG_CELL = """%%remote_train --host bulkhost
doubled = big * 2
total = int(big.sum())
"""


def _point_at(ip, ssh_config: str):  # type: ignore[no-untyped-def]
    """The shell's magics, with ``bulkhost`` resolved through ``ssh_config``."""
    magics = ip.magics_manager.registry["RemoteMagics"]
    magics.ssh_config = ssh_config
    magics.hosts = {ALIAS: {"python": PYTHON}}
    return magics


@pytest.fixture
def host(ip, tmp_path: Path) -> Iterator[Sshd]:
    """A host of its own, so that its log counts this test's logins only."""
    server = make_sshd(tmp_path / "sshd", alias=ALIAS, extra_config="LogLevel VERBOSE")
    server.start()
    magics = _point_at(ip, str(server.ssh_config))
    try:
        yield server
    finally:
        magics.connections.close()
        server.stop()


def _big_input(ip) -> int:
    import numpy as np

    ip.user_ns["big"] = np.arange(BULK_MIN_BYTES // 8 * 2, dtype=np.int64)  # 16 MiB in, 16 MiB back
    return int(ip.user_ns["big"].sum())


def _client(ip):
    return ip.magics_manager.registry["RemoteMagics"]._client(ALIAS)


def test_large_blobs_go_through_openssh_when_ssh_is_on_path(ip, host: Sshd) -> None:
    expected = _big_input(ip)
    known_hosts = host.known_hosts.read_bytes()

    result = run(ip, BIG_CELL)

    assert result.success, result.error_in_exec
    assert ip.user_ns["total"] == expected
    assert (ip.user_ns["doubled"] == ip.user_ns["big"] * 2).all()  # the 16 MiB output came back whole
    client = _client(ip)
    assert client.bulk_unavailable is None
    assert host.accepted_logins() == 2  # paramiko's control connection, and OpenSSH's for the blobs
    assert host.known_hosts.read_bytes() == known_hosts  # nothing added or updated


def test_without_ssh_on_path_large_blobs_go_through_paramiko(ip, host: Sshd, tmp_path: Path, monkeypatch) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    expected = _big_input(ip)

    result = run(ip, BIG_CELL)

    assert result.success, result.error_in_exec
    assert ip.user_ns["total"] == expected
    assert (ip.user_ns["doubled"] == ip.user_ns["big"] * 2).all()
    assert "no OpenSSH client" in (_client(ip).bulk_unavailable or "")
    assert host.accepted_logins() == 1  # the control connection carried everything


def test_bulk_ssh_none_sends_everything_through_paramiko(ip, host: Sshd) -> None:
    ip.magics_manager.registry["RemoteMagics"].hosts = {ALIAS: {"python": PYTHON, "bulk_ssh": None}}
    expected = _big_input(ip)

    result = run(ip, BIG_CELL)

    assert result.success, result.error_in_exec
    assert ip.user_ns["total"] == expected
    assert host.accepted_logins() == 1


def test_bulk_path_refuses_a_host_with_another_key_and_sends_it_nothing(ip, host: Sshd, tmp_path: Path) -> None:
    """paramiko verified the host; then another machine, with another key, answers at the same address
    (as an interception would, or a Match block sending `ssh` elsewhere): OpenSSH must refuse it."""
    _client(ip).hello()  # the control connection, verified against known_hosts
    known_hosts = host.known_hosts.read_bytes()
    port = host.port
    host.stop()  # the listener goes; the open connection stays (sshd's sessions outlive it)
    impostor = make_sshd(tmp_path / "impostor", alias=ALIAS, extra_config="LogLevel VERBOSE")
    (impostor.dir / "authorized_keys").write_bytes((host.dir / "authorized_keys").read_bytes())  # it would let us in
    config = impostor.dir / "sshd_config"
    config.write_text(config.read_text().replace(f"Port {impostor.port}\n", f"Port {port}\n"))
    impostor.port = port
    impostor.start()
    try:
        _big_input(ip)
        result = run(ip, BIG_CELL)

        assert not result.success
        error = result.error_in_exec
        assert isinstance(error, HostKeyError), error
        assert "whose key is not the one remote_magic checked" in str(error)
        assert "nothing was sent" in str(error)
        assert impostor.accepted_logins() == 0  # refused before logging in
        assert not (impostor.host_root / "blobs").exists() or not os.listdir(impostor.host_root / "blobs")
        assert host.known_hosts.read_bytes() == known_hosts
        assert "doubled" not in ip.user_ns
        # Small cells still run, over the verified control connection.
        assert run(ip, "%%remote_train --host bulkhost\nsmall = 2 + 3\n").success
        assert ip.user_ns["small"] == 5
    finally:
        impostor.stop()


@pytest.mark.parametrize("direction", ["upload", "download"])
def test_a_bulk_connection_that_drops_mid_transfer_is_finished_over_paramiko(ip, host: Sshd, direction: str) -> None:
    """The OpenSSH process dies while a 256 MiB blob is on its way (a killed ssh, a dropped second connection):
    the blob goes again over the control connection and the cell still gets every byte."""
    import numpy as np

    client = _client(ip)
    client.hello()
    link = client.bulk_link()
    ssh = link.pipe.process  # type: ignore[attr-defined]
    size = 256 * 1024 * 1024
    if direction == "upload":
        ip.user_ns["big"] = np.random.default_rng(5).integers(0, 255, size, dtype=np.uint8)
        cell = "%%remote_train --host bulkhost\ntotal = int(big.sum())\n"
        expected = int(ip.user_ns["big"].sum())
    else:
        cell = "%%remote_train --host bulkhost\nimport numpy as np\nbig = np.full(2**25, 3.0)\ntotal = int(big.sum())\n"
        expected = 3 * 2**25
    counter = "bytes_sent" if direction == "upload" else "bytes_received"
    start = getattr(client, counter)

    def kill_midway() -> None:
        deadline = time.monotonic() + 60
        while getattr(client, counter) < start + 32 * 1024 * 1024 and time.monotonic() < deadline:
            time.sleep(0.005)
        ssh.kill()

    killer = threading.Thread(target=kill_midway)
    killer.start()
    result = run(ip, cell)
    killer.join()

    assert ssh.poll() is not None  # it was killed, and the cell went on
    assert result.success, result.error_in_exec
    assert ip.user_ns["total"] == expected
    if direction == "download":
        assert ip.user_ns["big"].nbytes == size and float(ip.user_ns["big"][-1]) == 3.0
    # The next large blob brings the bulk path up again.
    _big_input(ip)
    assert run(ip, BIG_CELL).success
    assert client.bulk_link() is not link and not client.bulk_link().dead


@pytest.mark.parametrize("key_type", ["rsa", "ecdsa"])
def test_bulk_path_pins_rsa_and_ecdsa_host_keys_too(ip, tmp_path: Path, key_type: str) -> None:
    """paramiko calls an RSA key "ssh-rsa" while OpenSSH negotiates rsa-sha2-512 for it: the pin must still match."""
    import subprocess

    server = make_sshd(tmp_path / "sshd", alias=ALIAS, extra_config="LogLevel VERBOSE")
    key = server.dir / f"host_{key_type}"
    subprocess.run(["ssh-keygen", "-q", "-t", key_type, "-N", "", "-f", str(key)], check=True)
    config = server.dir / "sshd_config"
    config.write_text(config.read_text().replace(f"HostKey {server.dir / 'host_ed25519'}\n", f"HostKey {key}\n"))
    key_type_name, key_b64 = (server.dir / f"host_{key_type}.pub").read_text().split()[:2]
    server.known_hosts.write_text(f"[127.0.0.1]:{server.port} {key_type_name} {key_b64}\n")
    server.start()
    magics = _point_at(ip, str(server.ssh_config))
    try:
        expected = _big_input(ip)
        result = run(ip, BIG_CELL)
        assert result.success, result.error_in_exec
        assert ip.user_ns["total"] == expected
        assert _client(ip).bulk_unavailable is None
        assert server.accepted_logins() == 2
    finally:
        magics.connections.close()
        server.stop()


def test_a_large_output_shows_its_download_in_the_panel(ip, host: Sshd, capsys) -> None:
    result = run(ip, "%%remote_train --host bulkhost\nimport numpy as np\nout = np.ones(5 * 2**20)\n")  # 40 MiB

    assert result.success, result.error_in_exec
    assert ip.user_ns["out"].nbytes == 40 * 1024 * 1024
    shown = capsys.readouterr().out
    assert "downloading outputs:" in shown and "41.9 of 41.9 MB (100%)" in shown, shown


def test_an_ssh_that_cannot_log_in_falls_back_to_paramiko_and_says_how_to_fix_it(
    ip, host: Sshd, tmp_path: Path, capsys
) -> None:
    """An `ssh` that asks for what BatchMode cannot give (here: a stand-in that fails as OpenSSH does)."""
    fake = tmp_path / "ssh"
    fake.write_text("#!/bin/sh\necho 'root@127.0.0.1: Permission denied (publickey).' >&2\nexit 255\n")
    fake.chmod(0o755)
    ip.magics_manager.registry["RemoteMagics"].hosts = {ALIAS: {"python": PYTHON, "bulk_ssh": str(fake)}}
    expected = _big_input(ip)

    result = run(ip, BIG_CELL)

    assert result.success, result.error_in_exec
    assert ip.user_ns["total"] == expected
    shown = capsys.readouterr().out
    assert "go through paramiko, more slowly" in shown and "Permission denied (publickey)" in shown, shown
    assert "`ssh bulkhost true`" in shown
    assert run(ip, BIG_CELL).success
    assert "more slowly" not in capsys.readouterr().out  # said once


def test_a_host_behind_a_jump_host_gets_its_large_blobs_through_openssh_too(ip, tmp_path: Path) -> None:
    """ProxyJump: the bulk `ssh` goes through the same bastion, each hop pinned to the key paramiko verified."""
    jump = make_sshd(tmp_path / "jump", alias="jumpalias", extra_config="LogLevel VERBOSE")
    target = make_sshd(tmp_path / "target", alias=ALIAS, extra_config="LogLevel VERBOSE")
    known_hosts = tmp_path / "client_known_hosts"
    known_hosts.write_text(jump.host_key_line() + target.host_key_line())
    blocks = [
        target.write_client_config(tmp_path / "t", ALIAS, UserKnownHostsFile=str(known_hosts), ProxyJump="jumpalias"),
        jump.write_client_config(tmp_path / "j", "jumpalias", UserKnownHostsFile=str(known_hosts)),
    ]
    config = tmp_path / "client_config"
    config.write_text("".join(block.read_text() for block in blocks))
    magics = _point_at(ip, str(config))
    jump.start()
    target.start()
    try:
        expected = _big_input(ip)
        result = run(ip, BIG_CELL)

        assert result.success, result.error_in_exec
        assert ip.user_ns["total"] == expected
        assert (ip.user_ns["doubled"] == ip.user_ns["big"] * 2).all()
        assert _client(ip).bulk_unavailable is None
        assert target.accepted_logins() == 2 and jump.accepted_logins() == 2  # paramiko's chain and ssh's
        assert jump.sessions_started() == []  # the bastion only forwarded, for both
        assert known_hosts.read_text() == jump.host_key_line() + target.host_key_line()
    finally:
        magics.connections.close()
        target.stop()
        jump.stop()


def test_a_cell_that_fails_before_sending_leaves_no_login_after_unload(ip, host: Sshd) -> None:
    magics = ip.magics_manager.registry["RemoteMagics"]

    result = run(ip, "%%remote_train --host bulkhost\nmodel.fit(x_trian)\n")  # connects in the background, then fails
    magics.stop_background()
    magics.connections.close()
    logins = host.accepted_logins()
    time.sleep(2)

    assert "name 'model' is not defined" in str(result.error_in_exec)
    assert logins == 2  # the control connection and the bulk path it started, both before the close returned
    assert host.accepted_logins() == logins  # nothing logs in after the connections closed


def _interrupted_midway(ip, moved: Callable[[], int], cell: str, options: str = ""):  # type: ignore[no-untyped-def]
    """Run ``cell`` on bulkhost and press Ctrl-C (SIGINT to the main thread, as Jupyter's interrupt) once
    ``moved()`` passes 32 MiB; never after the cell ended."""
    import _thread

    ended = threading.Event()

    def ctrl_c_midway() -> None:
        deadline = time.monotonic() + 60
        while moved() < 32 * 1024 * 1024 and time.monotonic() < deadline and not ended.is_set():
            time.sleep(0.002)
        if not ended.is_set():
            _thread.interrupt_main()

    interrupter = threading.Thread(target=ctrl_c_midway)
    interrupter.start()
    try:
        return run(ip, f"%%remote_train --host bulkhost {options}\n" + cell)
    finally:
        ended.set()
        interrupter.join()


@pytest.mark.parametrize("path", ["openssh", "paramiko"])
def test_ctrl_c_during_a_large_upload_leaves_no_partial_blob_and_the_next_cells_work(ip, host: Sshd, path: str) -> None:
    import numpy as np

    if path == "paramiko":
        ip.magics_manager.registry["RemoteMagics"].hosts = {ALIAS: {"python": PYTHON, "bulk_ssh": None}}
    ip.user_ns["big"] = np.random.default_rng(9).integers(0, 255, 256 * 1024 * 1024, dtype=np.uint8)
    expected = int(ip.user_ns["big"].sum())
    client = _client(ip)
    client.hello()
    start = client.bytes_sent

    result = _interrupted_midway(ip, lambda: client.bytes_sent - start, "total = int(big.sum())\n")
    assert isinstance(result.error_in_exec, KeyboardInterrupt)

    # The host dropped the upload it was receiving (the kernel is still connected): no partial blob stays.
    partial = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        partial = list((host.host_root / "blobs").rglob("*.part-*"))
        if not partial:
            break
        time.sleep(0.1)
    assert partial == []
    assert run(ip, "%%remote_train --host bulkhost\nsmall = 2 + 2\n").success and ip.user_ns["small"] == 4
    result = run(ip, "%%remote_train --host bulkhost\ntotal = int(big.sum())\n")
    assert result.success, result.error_in_exec
    assert ip.user_ns["total"] == expected


@pytest.mark.parametrize("path", ["openssh", "paramiko"])
def test_ctrl_c_during_a_large_download_says_how_to_get_the_outputs_and_the_link_keeps_working(
    ip, host: Sshd, path: str, capsys, tmp_path: Path, monkeypatch
) -> None:
    import re

    if path == "paramiko":
        ip.magics_manager.registry["RemoteMagics"].hosts = {ALIAS: {"python": PYTHON, "bulk_ssh": None}}
    client = _client(ip)
    client.hello()
    start = client.bytes_received

    value = 3.0 if path == "openssh" else 4.0  # an output of its own: never in the local cache already
    monkeypatch.chdir(tmp_path)  # where --fetch would put the file
    cell = f"import numpy as np\nbig = np.full(2**26, {value})\nopen('log.txt', 'w').write('done')\n"
    result = _interrupted_midway(ip, lambda: client.bytes_received - start, cell, "--fetch log.txt")
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert "big" not in ip.user_ns
    shown = capsys.readouterr().out
    attach = re.search(r"interrupted while downloading the outputs.*(%remote_attach \S+ --host bulkhost)", shown)
    assert attach is not None
    assert "%remote_fetch" in shown and not (tmp_path / "log.txt").exists()  # stopped means no files either

    # The control connection still answers: the 512 MiB output is more than a request's inbox holds (64 frames of
    # 4 MiB), and a download nobody reads any more used to stop the link's reader for good.
    settled, last = time.monotonic() + 30, -1
    while client.bytes_received != last and time.monotonic() < settled:  # whatever the host still sends has come
        last = client.bytes_received
        time.sleep(1.0)
    answered: list[object] = []
    asking = threading.Thread(target=lambda: answered.append(client.status()), daemon=True)
    asking.start()
    asking.join(20)
    assert answered, "the connection no longer answers after the interrupted download"
    result = run(ip, attach[1])
    assert result.success, result.error_in_exec
    assert ip.user_ns["big"].nbytes == 2**29 and float(ip.user_ns["big"][-1]) == value


# ------------------------------------------------ the private known_hosts folders of the bulk path
OPENS_A_BULK_PATH = """
import sys
from remote_magic.transport import SSHTransport

transport = SSHTransport(sys.argv[1], python=sys.executable, ssh_config=sys.argv[2])
pipe = transport.spawn_bulk(["true"])
while pipe.read(65536):
    pass
print("bulk path used", flush=True)
sys.stdin.readline()
"""  # and ends without transport.close(), as a kernel does


def _pin_folders(parent: Path) -> list[Path]:
    return sorted(parent.glob("remote_magic-pin-*"))


def _open_bulk_path(sshd: Sshd, tmp: Path):  # type: ignore[no-untyped-def]
    """A process that logged in through the bulk path and waits for a line on stdin; its temp folder is ``tmp``."""
    process = subprocess.Popen(
        [PYTHON, "-c", OPENS_A_BULK_PATH, sshd.alias, str(sshd.ssh_config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, TMPDIR=str(tmp)),
    )
    assert process.stdout is not None and process.stdout.readline() == "bulk path used\n"
    return process


def test_a_process_that_ends_without_closing_leaves_no_pin_folder(sshd: Sshd, tmp_path: Path) -> None:
    process = _open_bulk_path(sshd, tmp_path)
    [folder] = _pin_folders(tmp_path)
    assert folder.name.startswith(f"remote_magic-pin-{process.pid}-") and (folder / "known_hosts").exists()
    assert folder.stat().st_mode & 0o777 == 0o700

    process.communicate("\n", timeout=30)  # it ends on its own, its connection never closed

    assert process.returncode == 0 and _pin_folders(tmp_path) == []


def test_the_pin_folder_of_a_killed_process_is_swept_by_the_next_one(sshd: Sshd, tmp_path: Path) -> None:
    """SIGKILL leaves no chance to clean up: the folder stays until another process makes its own."""
    killed = _open_bulk_path(sshd, tmp_path)
    [dead] = _pin_folders(tmp_path)
    killed.kill()
    killed.wait()
    assert dead.exists()
    older = tmp_path / "remote_magic-pin-old"  # an earlier version's: no lock; stale once unused for a day
    recent = tmp_path / "remote_magic-pin-recent"
    older.mkdir()
    recent.mkdir()
    os.utime(older, (time.time() - 2 * 86400,) * 2)
    elsewhere = tmp_path / "kept"
    elsewhere.mkdir()
    (tmp_path / "remote_magic-pin-link").symlink_to(elsewhere)

    live = _open_bulk_path(sshd, tmp_path)
    try:
        [mine] = [f for f in _pin_folders(tmp_path) if f.name.startswith(f"remote_magic-pin-{live.pid}-")]
        assert not dead.exists() and not older.exists()
        assert recent.exists() and elsewhere.exists() and (tmp_path / "remote_magic-pin-link").is_symlink()

        # A folder whose process lives is never swept, whoever sweeps.
        assert mine not in [Path(p) for p in sweep_stale_pin_folders(str(tmp_path))] and mine.exists()
    finally:
        live.communicate("\n", timeout=30)
    assert not mine.exists()

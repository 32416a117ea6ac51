"""Every bad input gets a clear message and changes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import MODEL_CELL, run

from remote_magic.errors import (
    AuthenticationError,
    ConnectionFailed,
    HostKeyError,
    HostSetupError,
    RemoteExecutionError,
)
from remote_magic.transport import SSHTransport
from remote_magic.wire.client import AgentClient


def _job_count(root: Path) -> int:
    jobs = root / "jobs"
    return len(os.listdir(jobs)) if jobs.exists() else 0


def test_undefined_name_is_named_and_nothing_is_sent(ip, sshd) -> None:
    before = _job_count(sshd.host_root)
    result = run(ip, "%%remote_train --host testhost\nmodel.fit(x_trian)\n")
    assert "name 'model' is not defined" in str(result.error_in_exec)
    assert _job_count(sshd.host_root) == before


def test_unpicklable_input_is_named_with_the_reason(ip, sshd) -> None:
    assert run(ip, "import threading\nlock = threading.Lock()\nsize = 3\n").success
    namespace_before = dict(ip.user_ns)
    before = _job_count(sshd.host_root)
    result = run(ip, "%%remote_train --host testhost\nwith lock:\n    size = size + 1\n")
    message = str(result.error_in_exec)
    assert "variable 'lock' (lock) cannot be sent" in message and "cannot pickle" in message
    assert _job_count(sshd.host_root) == before
    assert ip.user_ns["size"] == 3 and set(ip.user_ns) == set(namespace_before)


def test_unknown_host_key_is_refused_and_known_hosts_left_alone(ip, sshd, tmp_path) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    config = sshd.write_client_config(tmp_path / "config", "stranger", UserKnownHostsFile=str(known_hosts))
    ip.magics_manager.registry["RemoteMagics"].ssh_config = str(config)
    logins = sshd.accepted_logins()
    result = run(ip, "%%remote_train --host stranger\ny = 1\n")
    error = result.error_in_exec
    assert isinstance(error, HostKeyError)
    assert "host stranger ([127.0.0.1]" in str(error) and "is not in known_hosts" in str(error)
    assert "ssh stranger" in str(error) and "SHA256:" in str(error)
    assert known_hosts.read_text() == ""
    assert sshd.accepted_logins() == logins  # never authenticated, nothing ran


def test_a_host_where_nothing_listens_says_connection_refused_and_how_to_check(ip, sshd, tmp_path) -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on once this closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = sshd.write_client_config(tmp_path / "config", "downhost", Port=str(port))
    ip.magics_manager.registry["RemoteMagics"].ssh_config = str(config)
    result = run(ip, "%%remote_train --host downhost\ny = 1\n")
    assert isinstance(result.error_in_exec, ConnectionFailed)
    message = str(result.error_in_exec)
    assert f"host downhost (127.0.0.1 port {port}): Connection refused;" in message, message
    assert "`ssh downhost` works" in message and "Errno" not in message


def test_changed_host_key_is_refused(sshd, tmp_path) -> None:
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    key_type, key = (tmp_path / "other.pub").read_text().split()[:2]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {key_type} {key}\n")
    config = sshd.write_client_config(tmp_path / "config", "moved", UserKnownHostsFile=str(known_hosts))
    with pytest.raises(HostKeyError, match="does not match known_hosts") as caught:
        AgentClient(SSHTransport("moved", python=sys.executable, ssh_config=str(config))).hello()
    assert "ssh-keygen -R" in str(caught.value)


def test_refused_auth_names_user_host_and_keys(ip, sshd, tmp_path) -> None:
    stranger_key = tmp_path / "not_authorized"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger_key)], check=True)
    config = sshd.write_client_config(tmp_path / "config", "refuser", IdentityFile=str(stranger_key))
    ip.magics_manager.registry["RemoteMagics"].ssh_config = str(config)
    result = run(ip, "%%remote_train --host refuser\ny = 1\n")
    error = result.error_in_exec
    assert isinstance(error, AuthenticationError)
    assert "root@127.0.0.1" in str(error) and str(stranger_key) in str(error)


def test_exception_in_the_cell_at_epoch_two_shows_the_cell_line(ip, capsys) -> None:
    assert run(ip, MODEL_CELL).success
    cell = (
        "%%remote_train --host testhost\n"
        "class Boom(keras.callbacks.Callback):\n"
        "    def on_epoch_end(self, epoch, logs=None):\n"
        "        if epoch == 1:\n"
        "            raise ValueError('diverged at epoch 2')\n"
        "history = model.fit(x_train, y_train, epochs=5, verbose=0, callbacks=[Boom()])\n"
    )
    result = run(ip, cell)
    error = result.error_in_exec
    assert isinstance(error, RemoteExecutionError)
    assert error.exc_type == "ValueError" and "diverged at epoch 2" in str(error)
    assert 'File "<remote_train cell>", line 4' in error.remote_traceback
    assert "raise ValueError('diverged at epoch 2')" in error.remote_traceback
    assert "history" not in ip.user_ns and "Boom" not in ip.user_ns
    for now, before in zip(ip.user_ns["model"].get_weights(), ip.user_ns["weights_before"], strict=True):
        np.testing.assert_array_equal(now, before)
    assert "Epoch 1/5" in capsys.readouterr().out


def test_host_python_without_cloudpickle_says_what_to_install(ip, tmp_path) -> None:
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    result = run(ip, f"%%remote_train --host testhost --python {bare}/bin/python\ny = 1\n")
    error = result.error_in_exec
    assert isinstance(error, HostSetupError)
    assert f"{bare}/bin/python" in str(error) and "lacks cloudpickle, numpy" in str(error)
    assert "-m pip install cloudpickle numpy" in str(error)


def test_host_without_that_python_says_how_to_point_at_one(ip) -> None:
    result = run(ip, "%%remote_train --host testhost --python /opt/nowhere/python\ny = 1\n")
    assert isinstance(result.error_in_exec, HostSetupError)
    assert "has no Python at `/opt/nowhere/python`" in str(result.error_in_exec)


def test_bad_out_name_is_a_usage_error(ip) -> None:
    result = run(ip, "%%remote_train --out 'model,2x'\ny = 1\n")
    assert str(result.error_in_exec).endswith("not a name: '2x'")


def test_a_traceback_through_a_function_from_an_earlier_cell_names_that_cell_as_ipython_does(ip) -> None:
    """Issue 21: the frame read ``File "<ipython-input-...>", line 3`` (``/tmp/ipykernel_.../N.py`` in a kernel) with
    no source, where IPython says ``Cell In[2], line 3`` and shows the line."""
    assert run(ip, "def shares(values):\n    total = sum(values)\n    return [v / total for v in values]\n").success
    filename = ip.user_ns["shares"].__code__.co_filename
    label = " ".join(ip.compile.format_code_name(filename))
    assert label.startswith("Cell In[")
    result = run(ip, "%%remote_train\nparts = shares([0, 0])\n")
    error = result.error_in_exec
    assert isinstance(error, RemoteExecutionError) and error.exc_type == "ZeroDivisionError"
    assert f"{label}, line 3, in shares" in error.remote_traceback, error.remote_traceback
    assert "return [v / total for v in values]" in error.remote_traceback
    assert filename not in error.remote_traceback and "<dynamic-code>" not in error.remote_traceback

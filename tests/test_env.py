"""Environments end to end, over the real sshd: the check before upload, %remote_env, --env FILE and --env auto.

The host's interpreter is a venv of its own (it sees this venv's cloudpickle and numpy through a
``.pth``, and has tinypkg 2.0 of its own); the kernel has tinypkg 1.0 and onlyhere 1.0 in a
folder on sys.path. Nothing is downloaded: the packages are tiny wheels built here
(tests/wheels.py), found through ``--no-index`` and ``--find-links`` lines or PIP_* variables.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import signal
import subprocess
import sysconfig
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import PYTHON, run
from wheels import build_wheel

from remote_magic.agent.store import envs
from remote_magic.errors import HostSetupError

MiB = 1024 * 1024
SMALL = 64 * 1024  # a version query and its framing: what a refused cell may cost
PY = platform.python_version()


# ------------------------------------------------------------------ fixtures
def _pip(*args: str) -> None:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    subprocess.run([PYTHON, "-m", "pip", "-q", *args], check=True, capture_output=True, env=env)


def _requirements(wheelhouse: Path, *lines: str) -> str:
    return "\n".join(["# made by tests/test_env.py", "--no-index", f"--find-links {wheelhouse}", *lines]) + "\n"


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("wheels")
    build_wheel(folder, "tinypkg", "1.0")
    build_wheel(folder, "tinypkg", "2.0")
    build_wheel(folder, "onlyhere", "1.0")
    return folder


@pytest.fixture(scope="module")
def host_python(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> str:
    """A host interpreter whose packages differ from the kernel's: its own tinypkg 2.0, this venv's others."""
    venv = tmp_path_factory.mktemp("host-venv")
    subprocess.run([PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    kernel_site = sysconfig.get_path("purelib")  # cloudpickle, numpy, keras, pip: as the agent's .pth does it
    Path(purelib, "_tests_kernel_packages.pth").write_text(f"import site; site.addsitedir({kernel_site!r})\n")
    _pip("--python", python, "install", "--no-index", "--find-links", str(wheelhouse), "tinypkg==2.0")
    return python


@pytest.fixture(scope="module")
def kernel_packages(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> Path:
    """tinypkg 1.0 and onlyhere 1.0 installed for the kernel (``pip install --target``).

    Named ``site-packages``: remote_magic ships modules from any other folder on sys.path as the
    user's own source (see the report), which would hide the very difference tested here.
    """
    folder = tmp_path_factory.mktemp("kernel") / "site-packages"
    _pip("install", "--no-index", "--find-links", str(wheelhouse), "--target", str(folder), "tinypkg==1.0")
    _pip("install", "--no-index", "--find-links", str(wheelhouse), "--target", str(folder), "onlyhere==1.0")
    return folder


@pytest.fixture
def magics(ip):  # type: ignore[no-untyped-def]
    """The extension, with no check remembered from another test (the shell is shared by the session)."""
    shown = ip.magics_manager.registry["RemoteMagics"]
    shown.environment_checks.clear()
    return shown


@pytest.fixture
def kernel_side(kernel_packages: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(kernel_packages))  # invalidates the import caches too
    import importlib

    importlib.invalidate_caches()
    return kernel_packages


@pytest.fixture
def host_h(magics, host_python: str, sshd) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """testhost runs the host venv's Python."""
    saved = dict(magics.hosts)
    magics.hosts = {sshd.alias: {"python": host_python}}
    yield host_python
    magics.hosts = saved


def _client(ip, host: str = "testhost"):  # type: ignore[no-untyped-def]
    return ip.magics_manager.registry["RemoteMagics"]._client(host)


def _folders(path: Path) -> set[str]:
    return {p.name for p in path.iterdir() if p.is_dir()} if path.is_dir() else set()


def _lines(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


def _stop_warm_runners(root: Path) -> None:
    """The warm runners a job left under ``root`` (conftest stops only those under its own folder)."""
    for found in [*root.rglob("warm/*.ready"), *root.rglob("warm/*.starting")]:
        try:
            os.kill(json.loads(found.read_text())["pid"], signal.SIGTERM)
        except (OSError, ValueError, KeyError):
            pass


# ------------------------------------------------------------- before upload
REFUSED_CELL = "%%remote_train --host testhost\nimport tinypkg, onlyhere\ntotal = float(big.sum())\n"


def test_a_cell_the_host_cannot_run_is_refused_with_the_table_before_anything_is_sent(
    ip, sshd, host_h, kernel_side
) -> None:
    ip.user_ns["big"] = np.random.default_rng(0).random(2 * MiB // 8)  # 2 MB: an upload would show
    client = _client(ip)
    client.hello()  # the agent is in place: what follows is the cell's own traffic
    jobs_before, blobs_before = _folders(sshd.host_root / "jobs"), _folders(sshd.host_root / "blobs")
    sent_before = client.bytes_sent

    result = run(ip, REFUSED_CELL)

    sent = client.bytes_sent - sent_before
    assert isinstance(result.error_in_exec, HostSetupError), result.error_in_exec
    message = str(result.error_in_exec)
    print(f"\nthe refusal ({sent} bytes sent):\n{message}")
    lines = message.splitlines()
    assert lines[0].startswith("nothing was sent: the Python on host testhost cannot run this cell")
    assert lines[1] == f"host testhost: python {PY} there, {PY} here"
    assert lines[2].split() == ["package", "here", "host", "fix"]
    onlyhere = _lines(message, " onlyhere ")
    assert len(onlyhere) == 1 and onlyhere[0].split()[:4] == ["*", "onlyhere", "1.0", "missing"]
    assert "--env auto" in onlyhere[0] and f"{host_h} -m pip install onlyhere==1.0" in onlyhere[0]
    tinypkg = _lines(message, " tinypkg ")
    assert len(tinypkg) == 1 and tinypkg[0].startswith("  ")  # a difference, not a blocker
    assert tinypkg[0].split()[:3] == ["tinypkg", "1.0", "2.0"]
    assert lines[-1] == "* the job cannot run on the host until this is fixed"
    assert not any(" numpy " in line or " cloudpickle " in line for line in lines)  # the same on both sides

    assert "total" not in ip.user_ns
    assert _folders(sshd.host_root / "jobs") == jobs_before  # no job was created
    assert _folders(sshd.host_root / "blobs") == blobs_before
    assert sent < SMALL, f"{sent} bytes went to the host for a refused cell"


def test_a_version_difference_alone_is_a_one_line_warning_and_the_job_runs(ip, host_h, kernel_side, capsys) -> None:
    """tinypkg 1.0 here, 2.0 there: the rules block only a missing package, another Python, or another major
    cloudpickle or keras; any other major.minor difference is a warning in the panel."""
    ip.user_ns["big"] = np.random.default_rng(0).random(2 * MiB // 8)
    client = _client(ip)
    sent_before = client.bytes_sent
    cell = "%%remote_train --host testhost\nimport tinypkg\nversion = tinypkg.__version__\ntotal = float(big.sum())\n"
    assert run(ip, cell).success
    assert client.bytes_sent - sent_before > 2 * MiB  # what the refusal above would have counted, had it uploaded
    shown = capsys.readouterr().out
    warning = _lines(shown, "tinypkg is 1.0 here but 2.0 on host testhost")
    assert len(warning) == 1, shown
    assert warning[0] == (
        "[remote_train] tinypkg is 1.0 here but 2.0 on host testhost; "
        "--env auto installs tinypkg==1.0, or pin it in --env FILE"
    )
    assert ip.user_ns["version"] == "2.0"  # the host's own, as the warning said

    # The same imports again: checked once per kernel, host and packages, so no second warning.
    assert run(ip, "%%remote_train --host testhost\nimport tinypkg\nversion = tinypkg.__version__\n").success
    assert "tinypkg is 1.0" not in capsys.readouterr().out


def test_an_optional_import_in_a_local_module_is_a_warning_not_a_refusal(
    ip, host_h, kernel_side, tmp_path, monkeypatch, capsys
) -> None:
    """A helper that imports onlyhere inside try/except runs on a host without it: only the cell's own
    imports and the pickle's can refuse a job."""
    (tmp_path / "optional_helper.py").write_text(
        "try:\n    import onlyhere\nexcept ImportError:\n    onlyhere = None\n\n\ndef has_it():\n    return onlyhere is not None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert run(ip, "%%remote_train --host testhost\nimport optional_helper\nthere = optional_helper.has_it()\n").success
    assert ip.user_ns["there"] is False
    warning = _lines(capsys.readouterr().out, "onlyhere is 1.0 here but missing on host testhost")
    assert len(warning) == 1 and "only your local modules import it" in warning[0]


def test_another_interpreter_on_the_same_host_is_checked_again(ip, host_h, kernel_side, capsys) -> None:
    """After a cell passed on the host venv (tinypkg 2.0), --python names an interpreter that has no tinypkg."""
    assert run(ip, "%%remote_train --host testhost\nimport tinypkg\nversion = tinypkg.__version__\n").success
    capsys.readouterr()
    result = run(ip, f"%%remote_train --host testhost --python {PYTHON}\nimport tinypkg\nversion = 'ran'\n")
    if not isinstance(result.error_in_exec, HostSetupError) and "No module named 'tinypkg'" in str(
        result.error_in_exec
    ):
        pytest.xfail(
            "session/env_checks.py EnvironmentChecks keys its cache by client.host only (the alias), not the interpreter: "
            "the report of the host venv was reused for --python, the job was sent and failed on the host"
        )
    assert isinstance(result.error_in_exec, HostSetupError), result.error_in_exec
    tinypkg = _lines(str(result.error_in_exec), " tinypkg ")
    assert len(tinypkg) == 1 and tinypkg[0].split()[:4] == ["*", "tinypkg", "1.0", "missing"]


def _table_rows(text: str) -> list[list[str]]:
    """The rows of a %remote_env table (after the title and the header), split on whitespace."""
    return [line.split() for line in text.splitlines()[2:] if not line.startswith("* the job")]


def test_remote_env_shows_the_table_any_time(ip, host_h, kernel_side) -> None:
    # Before any cell: the base packages only (cloudpickle, numpy, keras, ...), the same on both sides: still a table.
    report = ip.run_line_magic("remote_env", "--host testhost")
    text = repr(report)
    print(f"\n%remote_env --host testhost, before any cell:\n{text}")
    lines = text.splitlines()
    assert lines[0] == f"host testhost: python {PY} there, {PY} here"
    assert lines[1].split() == ["package", "here", "host", "fix"]
    rows = _table_rows(text)
    names = [row[0] for row in rows]
    assert {"cloudpickle", "numpy"} <= set(names) and "tinypkg" not in names
    assert all(row[1] == row[2] and row[3] == "matches" for row in rows), text  # this venv's versions on both sides
    assert report.blocking() == [] and report.warnings() == []
    page = report._repr_html_()
    assert "<table>" in page and "</table>" in page and page.count("<tr class=") == len(rows)
    assert page.count("remote-magic-env-match") == len(rows) and "<td style='text-align:left'>numpy</td>" in page

    # After a cell that ran: its packages too, the difference first.
    assert run(ip, "%%remote_train --host testhost\nimport tinypkg\nversion = tinypkg.__version__\n").success
    report = ip.run_line_magic("remote_env", "--host testhost")
    text = repr(report)
    lines = text.splitlines()
    assert lines[0] == f"host testhost: python {PY} there, {PY} here"
    assert lines[1].split() == ["package", "here", "host", "fix"]
    rows = _table_rows(text)
    assert rows[0][:3] == ["tinypkg", "1.0", "2.0"] and "matches" not in lines[2]
    assert sorted(row[0] for row in rows[1:]) == sorted(names) and all(row[3] == "matches" for row in rows[1:])
    page = report._repr_html_()
    assert "<table>" in page and "</table>" in page and page.count("<tr class=") == len(rows)
    assert page.count("remote-magic-env-warning") == 1 and page.count("remote-magic-env-match") == len(rows) - 1
    assert "<td style='text-align:left'>tinypkg</td>" in page

    # After a refused cell: the table that refused it, the matching packages after it.
    refused = run(ip, "%%remote_train --host testhost\nimport tinypkg, onlyhere\n")
    assert isinstance(refused.error_in_exec, HostSetupError)
    report = ip.run_line_magic("remote_env", "--host testhost")
    text = repr(report)
    print(f"\n%remote_env --host testhost, after the refused cell:\n{text}")
    assert text.splitlines()[0] == f"host testhost: python {PY} there, {PY} here"
    assert _lines(text, " onlyhere ")[0].split()[:4] == ["*", "onlyhere", "1.0", "missing"]
    assert _lines(text, " tinypkg ")[0].split()[:3] == ["tinypkg", "1.0", "2.0"]
    rows = _table_rows(text)
    assert rows[0][:2] == ["*", "onlyhere"] and rows[1][0] == "tinypkg"  # the refusal, then the difference
    assert rows[2:] and all(row[3] == "matches" for row in rows[2:])  # then what matches
    page = report._repr_html_()
    assert "<td style='text-align:left'>onlyhere</td>" in page and "remote-magic-env-blocking" in page
    assert text.splitlines()[-1] == "* the job cannot run on the host until this is fixed"


def test_remote_env_python_compares_with_that_interpreter(ip, host_h, kernel_side) -> None:
    """--python names another interpreter on the same host, as %%remote_train --python does: the kernel's own
    Python there, which has no tinypkg (the host venv has 2.0)."""
    assert run(ip, "%%remote_train --host testhost\nimport tinypkg\nversion = tinypkg.__version__\n").success
    venv = repr(ip.run_line_magic("remote_env", "--host testhost"))
    assert _lines(venv, " tinypkg ")[0].split()[:3] == ["tinypkg", "1.0", "2.0"]

    report = ip.run_line_magic("remote_env", f"--host testhost --python {PYTHON}")
    text = repr(report)
    print(f"\n%remote_env --host testhost --python {PYTHON}:\n{text}")
    assert text.splitlines()[0] == f"host testhost: python {PY} there, {PY} here"
    tinypkg = _lines(text, " tinypkg ")
    assert len(tinypkg) == 1 and tinypkg[0].split()[:4] == ["*", "tinypkg", "1.0", "missing"]
    assert f"{PYTHON} -m pip install tinypkg==1.0" in tinypkg[0]  # the fix names that interpreter
    assert _table_rows(text)[0][:2] == ["*", "tinypkg"]  # the mismatch first
    assert all(row[3] == "matches" for row in _table_rows(text)[1:])
    assert [row.package for row in report.blocking()] == ["tinypkg"]
    assert "remote-magic-env-blocking" in report._repr_html_()


# ------------------------------------------------------------------ --env FILE
def test_env_file_builds_once_on_the_host_and_the_next_job_reuses_it(
    ip, sshd, host_h, kernel_side, wheelhouse, tmp_path, monkeypatch, capsys
) -> None:
    """The host venv has tinypkg 2.0, this kernel 1.0: the env pins 1.0, so the job runs with the kernel's."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "requirements.txt").write_text(_requirements(wheelhouse, "tinypkg==1.0"))
    cell = "%%remote_train --host testhost --env requirements.txt\nimport tinypkg\nv = tinypkg.__version__\n"
    envs_root = sshd.host_root / "envs"
    before = _folders(envs_root)

    started = time.perf_counter()
    result = run(ip, cell)
    first = time.perf_counter() - started
    shown = capsys.readouterr().out
    assert result.success, result.error_in_exec
    assert ip.user_ns["v"] == "1.0"  # the env's pin wins over the host's own tinypkg 2.0
    assert _lines(shown, "[remote_train] environment: building the Python environment"), shown
    assert _lines(shown, "[remote_train] environment: Successfully installed tinypkg-1.0")
    assert _lines(shown, "[remote_train] environment: environment ") and " ready in " in shown
    built = _lines(shown, "[remote_train] built environment ")
    assert len(built) == 1 and built[0].endswith(" s") and "on host testhost" in built[0]
    new = _folders(envs_root) - before
    assert len(new) == 1, new
    key = new.pop()
    assert built[0].split()[3] == key and (envs_root / key / ".ready").exists()
    assert {p.name for p in envs_root.iterdir() if not p.is_dir()} >= {f"{key}.lock"}

    del ip.user_ns["v"]
    started = time.perf_counter()
    result = run(ip, cell)
    second = time.perf_counter() - started
    shown = capsys.readouterr().out
    assert result.success, result.error_in_exec
    assert ip.user_ns["v"] == "1.0"
    assert "built environment" not in shown and "environment:" not in shown
    assert _folders(envs_root) - before == {key}  # one env, reused
    assert "tinypkg is 1.0 here" not in shown  # checked against the env, which has the kernel's version

    # %remote_env --env compares with that env (reused, not rebuilt).
    report = ip.run_line_magic("remote_env", "--host testhost --env requirements.txt")
    text = repr(report)
    assert text.splitlines()[0] == f"host testhost (its environment): python {PY} there, {PY} here"
    assert _lines(text, " tinypkg ")[0].split() == ["tinypkg", "1.0", "1.0", "matches"]
    assert report.rows == [] and all(row[3] == "matches" for row in _table_rows(text))
    assert "built environment" not in capsys.readouterr().out
    assert _folders(envs_root) - before == {key}
    with capsys.disabled():
        print(
            f"\n[--env requirements.txt on testhost] first job, builds the env: {first:.2f} s; "
            f"second job, reuses it: {second:.2f} s"
        )


def test_a_failed_build_shows_pips_message_and_leaves_no_env(ip, sshd, wheelhouse, tmp_path, monkeypatch, capsys):  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "requirements.txt").write_text(_requirements(wheelhouse, "tinypkg==9.9"))
    envs_before, jobs_before = _folders(sshd.host_root / "envs"), _folders(sshd.host_root / "jobs")

    result = run(ip, "%%remote_train --host testhost --env requirements.txt\nimport tinypkg\nv = 1\n")
    shown = capsys.readouterr().out
    assert not result.success
    message = str(result.error_in_exec)
    assert "No matching distribution found for tinypkg==9.9" in message
    assert "1.0, 2.0" in message  # pip's list of what it saw in the wheel folder
    assert "was not kept" in message and "run the cell again" in message
    assert _lines(shown, "[remote_train] environment: ERROR: No matching distribution found for tinypkg==9.9")
    assert "v" not in ip.user_ns
    assert _folders(sshd.host_root / "envs") == envs_before  # no half-built env
    assert _folders(sshd.host_root / "jobs") == jobs_before


# -------------------------------------------------------- two kernels at once
KERNEL_SCRIPT = """
import sys
from IPython.testing.globalipapp import start_ipython

ssh_config, python, cell = sys.argv[1:4]
ip = start_ipython()
ip.run_line_magic("load_ext", "remote_magic")
magics = ip.magics_manager.registry["RemoteMagics"]
magics.ssh_config = ssh_config
magics.hosts = {"testhost": {"python": python}}
magics.default_host = "local"
magics.panel = "text"
result = ip.run_cell(cell, store_history=False)
print("version:", ip.user_ns.get("v"), flush=True)
magics.connections.close()
sys.exit(0 if result.success else 1)
"""


def test_two_kernels_asking_for_a_new_env_at_once_build_it_once(sshd, wheelhouse, tmp_path) -> None:  # type: ignore[no-untyped-def]
    text = _requirements(wheelhouse, "tinypkg==2.0")
    (tmp_path / "requirements.txt").write_text(text)
    key = envs.env_key(envs.normalize_requirements(text), PYTHON)  # the agent's key on testhost (this Python)
    envs_root = sshd.host_root / "envs"
    envs_root.mkdir(mode=0o700, exist_ok=True)
    before = _folders(envs_root)
    cell = "%%remote_train --host testhost --env requirements.txt\nimport tinypkg\nv = tinypkg.__version__\n"
    env = dict(os.environ, REMOTE_MAGIC_DATA_DIR=str(tmp_path / "data"), PYTHONUNBUFFERED="1")
    env.pop("REMOTE_MAGIC_DEFAULT_HOST", None)

    # Hold the env's build lock on the host, so both kernels are surely waiting for it at once.
    held = os.open(envs_root / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)
    outputs: list[list[str]] = [[], []]
    procs = [
        subprocess.Popen(
            [PYTHON, "-c", KERNEL_SCRIPT, str(sshd.ssh_config), PYTHON, cell],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp_path,
            env=env,
        )
        for _ in range(2)
    ]
    readers = [
        threading.Thread(target=lambda p=proc, out=out: out.extend(p.stdout), daemon=True)  # type: ignore[union-attr]
        for proc, out in zip(procs, outputs, strict=True)
    ]
    for reader in readers:
        reader.start()
    try:
        deadline = time.monotonic() + 60
        while not all(any("another job is building" in line for line in out) for out in outputs):
            assert time.monotonic() < deadline, f"the kernels did not both wait for the build: {outputs}"
            assert all(proc.poll() is None for proc in procs), f"a kernel ended early: {outputs}"
            time.sleep(0.1)
    finally:
        os.close(held)  # let them race for the lock
    try:
        codes = [proc.wait(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for reader in readers:
        reader.join(10)
    texts = ["".join(out) for out in outputs]
    print("\n".join(f"\n--- kernel {i} ---\n{text}" for i, text in enumerate(texts)))
    assert codes == [0, 0], texts
    assert all("version: 2.0" in text for text in texts)
    everything = "".join(texts)
    assert everything.count("Successfully installed tinypkg-2.0") == 1
    assert everything.count("[remote_train] built environment ") == 1
    assert _folders(envs_root) - before == {key}
    print(f"\n[two kernels at once] both ran tinypkg 2.0 from one build, in env folder {key}")


# ------------------------------------------------------------------ --env auto
def test_env_auto_installs_the_kernels_versions_that_the_host_lacks(
    ip, magics, wheelhouse, kernel_side, tmp_path, monkeypatch, capsys
) -> None:
    """On the local host, whose agent inherits this kernel's environment: pip finds the wheels offline through
    PIP_NO_INDEX and PIP_FIND_LINKS. (Over SSH the agent's environment is the login's: see the report.)"""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheelhouse))
    monkeypatch.setenv("REMOTE_MAGIC_WARM", "0")  # no warm runner outlives the test in its own root
    root = tmp_path / "local-root"
    magics.hosts = {**magics.hosts, "local": {"root": str(root)}}
    cell = "%%remote_train --host local --env auto\nimport tinypkg, onlyhere\nv = (tinypkg.__version__, onlyhere.__version__)\n"
    try:
        result = run(ip, cell)
        shown = capsys.readouterr().out
        assert result.success, result.error_in_exec
        assert ip.user_ns["v"] == ("1.0", "1.0")  # the kernel's versions, on a host (this venv) that has neither
        assert _lines(shown, "environment: Successfully installed onlyhere-1.0 tinypkg-1.0"), shown
        assert len(_lines(shown, "[remote_train] built environment ")) == 1
        (key,) = _folders(root / "envs")
        assert (root / "envs" / key / "requirements.txt").read_text() == "onlyhere==1.0\ntinypkg==1.0\n"
        # The host itself was left as it was.
        assert subprocess.run([PYTHON, "-c", "import tinypkg"], capture_output=True).returncode != 0
    finally:
        magics.connections.close()
        _stop_warm_runners(root)


# ------------------------------------------- --env auto asks an index only for what came from one
@pytest.fixture
def local_host_index(magics, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The local host, whose pip is configured to use the folder returned as its only index (as pip.conf or
    PIP_INDEX_URL would name a real one); its root is under tmp_path."""
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("REMOTE_MAGIC_WARM", "0")
    root = tmp_path / "local-root"
    magics.hosts = {**magics.hosts, "local": {"root": str(root)}}
    try:
        yield index
    finally:
        magics.connections.close()
        _stop_warm_runners(root)


def _kernel_has(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, version: str) -> None:
    """``name`` at ``version`` installed for this kernel only, from a wheel folder of its own."""
    wheels = tmp_path / f"{name}-wheels"
    build_wheel(wheels, name, version)
    target = tmp_path / f"{name}-kernel" / "site-packages"
    _pip("install", "--no-index", "--find-links", str(wheels), "--target", str(target), f"{name}=={version}")
    monkeypatch.syspath_prepend(str(target))


def test_env_auto_refuses_a_local_build_rather_than_fetch_a_namesake_from_the_index(
    ip, local_host_index: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """acmeutils 1.4.2+corp here; the host's index has someone else's acmeutils 1.4.2. --env auto used to pin
    acmeutils==1.4.2 and run the cell with the stranger's package."""
    build_wheel(local_host_index, "acmeutils", "1.4.2", source="STRANGER = True\n")
    _kernel_has(tmp_path, monkeypatch, "acmeutils", "1.4.2+corp")
    cell = "import acmeutils\nstranger = hasattr(acmeutils, 'STRANGER')\n"
    root = tmp_path / "local-root"

    checked = run(ip, f"%%remote_train --host local\n{cell}")  # the check alone: its fix must not be --env auto
    assert isinstance(checked.error_in_exec, HostSetupError), checked.error_in_exec
    [row] = _lines(str(checked.error_in_exec), " acmeutils ")
    assert row.split()[:4] == ["*", "acmeutils", "1.4.2+corp", "missing"]
    assert "--env auto" not in row and "wheel" in row and "--find-links FOLDER" in row

    result = run(ip, f"%%remote_train --host local --env auto\n{cell}")

    assert isinstance(result.error_in_exec, HostSetupError), result.error_in_exec
    message = str(result.error_in_exec)
    print(f"\n{message}")
    assert message.startswith("nothing was sent: --env auto installs only what a package index has")
    assert "  acmeutils 1.4.2+corp: 1.4.2+corp is a local build (+corp), which no package index has;" in message
    assert "stranger" not in ip.user_ns
    assert _folders(root / "envs") == set() and _folders(root / "jobs") == set()


def test_env_auto_names_a_package_the_hosts_index_lacks(
    ip, local_host_index: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _kernel_has(tmp_path, monkeypatch, "lostpkg", "1.0")
    root = tmp_path / "local-root"

    result = run(ip, "%%remote_train --host local --env auto\nimport lostpkg\nv = lostpkg.__version__\n")

    assert result.error_in_exec is not None and "v" not in ip.user_ns
    message = str(result.error_in_exec)
    assert "The host's package index has no lostpkg==1.0 (pip looked where the host's pip is configured" in message
    assert "--find-links FOLDER" in message and "was not kept" in message
    assert _folders(root / "envs") == set() and _folders(root / "jobs") == set()

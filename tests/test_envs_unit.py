"""Per-job environments on the host (agent/store/envs.py) and the kernel/host comparison (project/envcheck.py).

Nothing is downloaded: the packages are tiny wheels built here (tests/wheels.py), found through
``--no-index`` and ``--find-links`` lines in the requirements lists.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import numpy
import pytest
from wheels import build_wheel

from remote_magic.agent import jobs
from remote_magic.agent.store import envs, versions
from remote_magic.errors import HostSetupError
from remote_magic.project import envcheck
from remote_magic.project.envcheck import EnvReport, Row

ROOT_DIR = Path(__file__).resolve().parent.parent
HAS_UV = shutil.which("uv") is not None


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("wheels")
    build_wheel(folder, "tinypkg", "1.0", requires=["numpy"])  # numpy: met by the host's, through the .pth
    build_wheel(folder, "tinypkg", "2.0")
    build_wheel(folder, "six", "99.0")  # the host has six 1.x: the env's pin must win
    return folder


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("host-root"))


def _requirements(wheelhouse: Path, *lines: str) -> str:
    return "\n".join(["# made by the tests", "--no-index", f"--find-links {wheelhouse}", *lines]) + "\n"


def _run_in(python: str, code: str) -> str:
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(params=["pip", "uv"])
def installer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "uv" and not HAS_UV:
        pytest.skip("uv is not on PATH here: the pip path is the one that runs")
    monkeypatch.setenv("REMOTE_MAGIC_ENV_INSTALLER", request.param)
    return request.param


# ---------------------------------------------------------------- the list
def test_uv_is_not_on_this_machine_so_pip_builds_the_envs() -> None:
    print(f"\nuv on PATH: {shutil.which('uv')}; host pip: {envs.host_pip_version()}")
    assert envs.host_pip_version() is not None and envs.host_pip_version() >= (22, 3)


def test_normalize_requirements_options_first_then_sorted_unique() -> None:
    text = """
        # a comment
        pandas==2.2.2   # trailing comment
        --no-index
        numpy  >= 1.26
        -f /wheels
        pandas==2.2.2
        --extra-index-url https://example.org/simple
        scipy \\
          ==1.13
    """
    assert envs.normalize_requirements(text) == [
        "--no-index",
        "-f /wheels",
        "--extra-index-url https://example.org/simple",
        "numpy >= 1.26",
        "pandas==2.2.2",
        "scipy ==1.13",
    ]
    assert envs.normalize_requirements("# only\n\n") == []


def test_env_key_ignores_order_and_comments_but_not_the_interpreter() -> None:
    one = envs.normalize_requirements("b==1\na==2\n--no-index\n")
    two = envs.normalize_requirements("--no-index\n# x\na==2\nb==1\na==2\n")
    assert envs.env_key(one) == envs.env_key(two)
    assert len(envs.env_key(one)) == 16 and int(envs.env_key(one), 16) >= 0
    assert envs.env_key(one) != envs.env_key(envs.normalize_requirements("a==2\nb==2\n--no-index"))
    base = os.path.realpath(sys.executable)  # the same Python by another path: another key (its venvs differ)
    assert envs.env_key(one, base) != envs.env_key(one)
    assert versions.env_python_version(sys.executable) == ".".join(map(str, sys.version_info[:3]))


def test_an_empty_list_is_refused_with_the_fix(root: str) -> None:
    with pytest.raises(jobs.AgentError, match="names no package"):
        envs.ensure(root, "# nothing\n--no-index\n")


def test_env_python_is_none_until_ready_and_keys_are_checked(root: str) -> None:
    assert envs.env_python(root, "0123456789abcdef") is None
    with pytest.raises(jobs.AgentError):
        envs.env_python(root, "../../etc")


# ----------------------------------------------------------------- builds
def test_ensure_builds_once_then_reuses(root: str, wheelhouse: Path, installer: str) -> None:
    text = _requirements(wheelhouse, f"tinypkg==1.0  # {installer}")
    lines: list[str] = []
    result = envs.ensure(root, text, lines.append)
    print(f"\n[{installer}] build of a 1-wheel env: {result.seconds:.2f} s")
    assert result.built and result.python == envs.env_python(root, result.key)
    assert result.python == os.path.join(root, "envs", result.key, "bin", "python")
    # the pinned version, and the host's own packages (numpy, cloudpickle, this package) still importable
    out = _run_in(
        result.python,
        "import json, tinypkg, numpy, cloudpickle, remote_magic.agent.store.envs as e; "
        "print(json.dumps([tinypkg.__version__, numpy.__version__, numpy.__file__, cloudpickle.__version__]))",
    )
    tiny, np_version, np_file, cp_version = json.loads(out)
    assert tiny == "1.0"
    assert (np_version, cp_version) == (numpy.__version__, cloudpickle.__version__)
    assert Path(np_file).resolve() == Path(numpy.__file__).resolve()  # the host's numpy, not a new copy
    # the build's output came line by line: the venv step, pip's own lines, the end
    assert lines[0].startswith("building the Python environment")
    assert any("Successfully installed tinypkg-1.0" in line for line in lines)
    assert lines[-1].startswith(f"environment {result.key} ready")
    # private: 0700 folders, 0600 files
    env = Path(root, "envs", result.key)
    assert (Path(root, "envs").stat().st_mode & 0o777, env.stat().st_mode & 0o777) == (0o700, 0o700)
    assert (env / "requirements.txt").stat().st_mode & 0o777 == 0o600
    assert (env / "requirements.txt").read_text().splitlines()[-1].startswith("tinypkg==1.0")

    again: list[str] = []
    started = time.perf_counter()
    reused = envs.ensure(root, text.replace("# made by the tests", ""), again.append)
    took = time.perf_counter() - started
    print(f"[{installer}] reuse of the same env: {took * 1000:.1f} ms")
    assert (reused.built, reused.python, reused.key) == (False, result.python, result.key)
    assert again == [] and took < 1.0


def test_the_env_sees_host_packages_after_its_own(root: str, wheelhouse: Path) -> None:
    """A pin of a package the host has wins in the env; the host keeps its own."""
    result = envs.ensure(root, _requirements(wheelhouse, "six==99.0"))
    assert _run_in(result.python, "import six; print(six.__version__)") == "99.0"
    host_six = versions.installed_versions(["six"])["six"]
    assert host_six is not None and host_six != "99.0"
    assert versions.installed_versions(["six", "numpy"], result.python) == {"six": "99.0", "numpy": numpy.__version__}
    pth = next(Path(root, "envs", result.key).rglob(envs.PTH_FILE)).read_text()
    assert "site.addsitedir" in pth and envs.host_site_dirs()[0] in pth
    # the env's site-packages come first on sys.path, then the host's
    paths = json.loads(_run_in(result.python, "import json, sys; print(json.dumps(sys.path))"))
    own = next(i for i, p in enumerate(paths) if p.startswith(os.path.join(root, "envs")))
    host = paths.index(envs.host_site_dirs()[0])
    assert own < host


def test_two_processes_asking_at_once_build_once(root: str, wheelhouse: Path) -> None:
    text = _requirements(wheelhouse, "tinypkg==2.0")
    key = envs.env_key(envs.normalize_requirements(text))
    os.makedirs(os.path.join(root, "envs"), exist_ok=True)
    script = (
        "import json, sys\n"
        "from remote_magic.agent.store import envs\n"
        "r = envs.ensure(sys.argv[1], sys.argv[2], lambda line: print('out:', line, flush=True))\n"
        "print('result:', json.dumps([r.built, r.python]), flush=True)\n"
    )
    # Hold the env's lock so both start waiting; then let them race for it.
    held = os.open(os.path.join(root, "envs", f"{key}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)
    procs = [
        subprocess.Popen([sys.executable, "-c", script, root, text], stdout=subprocess.PIPE, text=True, cwd=ROOT_DIR)
        for _ in range(2)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert "waiting" in proc.stdout.readline()  # both are blocked on the lock now
    finally:
        os.close(held)
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    results = [json.loads(out.split("result: ", 1)[1]) for out in outputs]
    assert sorted(built for built, _ in results) == [False, True]
    assert results[0][1] == results[1][1] == envs.env_python(root, key)
    everything = "".join(outputs)
    assert everything.count("building the Python environment") == 1
    assert everything.count("Successfully installed tinypkg-2.0") == 1


def test_a_failed_build_says_what_pip_said_and_leaves_nothing(root: str, wheelhouse: Path) -> None:
    text = _requirements(wheelhouse, "tinypkg==3.0")
    key = envs.env_key(envs.normalize_requirements(text))
    lines: list[str] = []
    with pytest.raises(jobs.AgentError) as failure:
        envs.ensure(root, text, lines.append)
    message = str(failure.value)
    assert "No matching distribution found for tinypkg==3.0" in message
    assert "1.0, 2.0" in message  # pip's list of the versions it saw
    assert "was not kept" in message and "run the cell again" in message
    assert any("No matching distribution" in line for line in lines)
    assert not os.path.exists(os.path.join(root, "envs", key)) and envs.env_python(root, key) is None
    # The lock was let go: the next build of a good list goes ahead.
    assert envs.ensure(root, _requirements(wheelhouse, "tinypkg==1.0")).python


def test_a_requirement_the_hosts_index_lacks_is_named_with_the_fix(root: str, wheelhouse: Path) -> None:
    """What --env auto asks for by name must be on the host's index: pip's refusal becomes one that says what to do."""
    with pytest.raises(jobs.AgentError) as failure:
        envs.ensure(root, _requirements(wheelhouse, "tinypkg==2.0", "acme-utils==1.4.2"))
    message = str(failure.value)
    assert "The host's package index has no acme-utils==1.4.2 (pip looked where the host's pip is configured" in message
    assert "--find-links FOLDER" in message and "run the cell again" in message
    assert "No matching distribution found for acme-utils==1.4.2" in message  # pip's own words follow


def test_a_build_over_its_time_is_stopped(root: str, wheelhouse: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hang = socket.socket()  # an index that accepts the connection and never answers
    hang.bind(("127.0.0.1", 0))
    hang.listen(8)
    monkeypatch.setenv("REMOTE_MAGIC_ENV_TIMEOUT", "4")
    text = f"--index-url http://127.0.0.1:{hang.getsockname()[1]}/simple\ntinyhang==1.0\n"
    key = envs.env_key(envs.normalize_requirements(text))
    started = time.monotonic()
    try:
        with pytest.raises(jobs.AgentError, match="longer than 4 s") as failure:
            envs.ensure(root, text)
    finally:
        hang.close()
    assert time.monotonic() - started < 30
    assert "REMOTE_MAGIC_ENV_TIMEOUT" in str(failure.value)
    assert not os.path.exists(os.path.join(root, "envs", key))


def test_without_a_usable_host_pip_the_env_gets_its_own(
    root: str, wheelhouse: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(envs, "host_pip_version", lambda: None)
    monkeypatch.setenv("REMOTE_MAGIC_ENV_INSTALLER", "pip")
    lines: list[str] = []
    result = envs.ensure(root, _requirements(wheelhouse, "tinypkg==1.0", "six==99.0"), lines.append)
    assert result.built
    assert _run_in(result.python, "import tinypkg; print(tinypkg.__version__)") == "1.0"
    assert any(line.startswith("Successfully installed") and "tinypkg-1.0" in line for line in lines)
    # ensurepip ran first: here the host's newer pip, visible through the .pth, already satisfies it
    assert any("pip" in line and ("already satisfied" in line or "Successfully installed" in line) for line in lines)


def test_installed_versions_here_normalizes_names() -> None:
    got = versions.installed_versions(["NumPy", "cloud_pickle", "CloudPickle", "typing.extensions", "no-such-dist"])
    assert got["NumPy"] == numpy.__version__
    assert got["CloudPickle"] == cloudpickle.__version__
    assert got["cloud_pickle"] is None  # another name, not a spelling of cloudpickle
    assert got["typing.extensions"] is not None
    assert got["no-such-dist"] is None


# --------------------------------------------------------------- envcheck
def test_distributions_for_maps_imports_and_skips_the_stdlib_and_local_modules() -> None:
    found = envcheck.distributions_for(["numpy", "numpy.linalg", "os", "json", "cloudpickle", "no_such_local_mod"])
    assert found == {"numpy": "numpy", "cloudpickle": "cloudpickle"}
    assert envcheck.distributions_for(["remote_magic"]) == {"remote_magic": "remote_magic"}  # editable install
    versions = envcheck.local_versions(["numpy", "no-such-dist"])
    assert versions == {"numpy": numpy.__version__, "no-such-dist": None}


def test_a_package_installed_during_the_session_is_seen_by_the_next_check(tmp_path: Path, monkeypatch) -> None:
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    first = envcheck.installed_modules()
    assert envcheck.installed_modules() is first  # nothing installed since: not read again
    assert envcheck.distributions_for(["freshpkg"]) == {}

    info = site / "fresh_pkg-1.0.dist-info"  # what `pip install fresh-pkg` leaves
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fresh-pkg\nVersion: 1.0\n")
    (info / "top_level.txt").write_text("freshpkg\n")

    assert envcheck.distributions_for(["freshpkg"]) == {"freshpkg": "fresh-pkg"}
    assert envcheck.local_versions(["fresh-pkg"]) == {"fresh-pkg": "1.0"}


def test_a_deleted_working_folder_does_not_break_the_check(tmp_path: Path, monkeypatch) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()  # a kernel started in a temp folder that was removed since
    assert envcheck.distributions_for(["numpy"]) == {"numpy": "numpy"}


def _report() -> EnvReport:
    local = {
        "cloudpickle": "3.1.0",
        "keras": "3.5.0",
        "pandas": "2.2.2",
        "scikit-learn": "1.5.0",
        "numpy": "2.1.3",
        "torch": "2.13.0+cpu",
        "tensorflow-cpu": "2.18.0",
        "polars": "1.9.0",
        "nvidia-cudnn-cu12": "9.1.0",
        "not-here-either": None,
    }
    remote = {
        "cloudpickle": "2.2.1",  # major: blocking
        "keras": "3.6.0",  # minor: warning
        "Pandas": "2.2.3",  # patch only: a matching row, not a difference (and names compare by PEP 503)
        "scikit_learn": "1.4.2",  # minor: warning
        "numpy": "2.1.0",
        "torch": "2.11.0+cu124",  # minor of a host build: a warning, never pinned
        "tensorflow-cpu": "2.18.1",
        "nvidia-cudnn-cu12": None,  # missing host build: blocking, no --env auto in its fix
        # polars missing
    }
    return envcheck.compare("gpu1", local, remote, "3.11.7", "3.10.12", host_python_path="/opt/py/bin/python3")


def test_compare_sorts_blocking_first_then_by_name() -> None:
    report = _report()
    rows = {row.package: row for row in report.rows}
    assert [row.package for row in report.blocking()] == ["cloudpickle", "nvidia-cudnn-cu12", "polars", "python"]
    assert [row.package for row in report.warnings()] == ["keras", "scikit-learn", "torch"]
    assert "pandas" not in rows and "numpy" not in rows and "tensorflow-cpu" not in rows
    assert rows["python"].fix == "use a python 3.11 on the host: --python /path/to/python3.11"
    assert rows["polars"] == Row(
        "polars", "1.9.0", None, "`--env auto`, or `/opt/py/bin/python3 -m pip install polars==1.9.0` on the host", True
    )
    assert "--env auto" not in rows["nvidia-cudnn-cu12"].fix and "--env FILE" in rows["nvidia-cudnn-cu12"].fix
    assert rows["cloudpickle"].blocking and "cloudpickle==3.1.0" in rows["cloudpickle"].fix
    assert rows["scikit-learn"].fix == "--env auto installs scikit-learn==1.5.0, or pin it in --env FILE"
    assert rows["torch"].fix == "pin it in --env FILE" and not rows["torch"].blocking


def test_compare_keras_major_blocks_and_equal_envs_have_no_rows() -> None:
    report = envcheck.compare("h", {"keras": "3.0.0"}, {"keras": "2.15.0"}, "3.11.7", "3.11.4")
    assert [(r.package, r.blocking) for r in report.rows] == [("keras", True)]
    same = envcheck.compare("h", {"numpy": "2.1.3", "x": "1.0"}, {"numpy": "2.1.0", "x": "1.0.1"}, "3.11.7", "3.11.9")
    assert same.rows == [] and "matches" in same.text()
    assert same.blocking() == [] and same.warnings() == []


def test_auto_requirements_pins_missing_and_minor_differences_but_not_host_builds() -> None:
    assert envcheck.auto_requirements(_report()) == [
        "cloudpickle==3.1.0",
        "keras==3.5.0",
        "polars==1.9.0",
        "scikit-learn==1.5.0",
    ]
    builds = envcheck.compare("h", {"jaxlib": "0.4.30", "torch": "2.13.0+cpu"}, {"torch": "2.11.0"}, "3.11.7", "3.11.7")
    assert envcheck.auto_requirements(builds) == []  # the host keeps its own builds, labelled or not


def test_env_auto_never_asks_an_index_for_a_local_build_the_host_lacks() -> None:
    """acme-utils 1.4.2+corp used to become acme-utils==1.4.2, fetched from whatever index has that name."""
    local = {"acme-utils": "1.4.2+corp", "polars": "1.9.0", "torch": "2.13.0+cpu"}
    report = envcheck.compare("gpu1", local, {"torch": "2.11.0"}, "3.11.7", "3.11.7", "/opt/py", origins={})
    rows = {row.package: row for row in report.rows}
    acme = rows["acme-utils"]
    assert acme.blocking and acme.unpinnable == "1.4.2+corp is a local build (+corp), which no package index has"
    assert "--env auto" not in acme.fix and "1.4.2" not in acme.fix.replace("1.4.2+corp", "")
    assert "wheel" in acme.fix and "--find-links FOLDER" in acme.fix and "--env FILE" in acme.fix
    [refusal_line] = [line for line in report.refusal().splitlines() if " acme-utils " in line]
    assert "--env auto" not in refusal_line
    assert rows["torch"].unpinnable is None and rows["torch"].fix == "pin it in --env FILE"  # a host build, as before

    with pytest.raises(HostSetupError) as refused:
        envcheck.auto_requirements(report)
    message = str(refused.value)
    print(f"\n{message}")
    assert message.startswith("nothing was sent: --env auto installs only what a package index has")
    assert "  acme-utils 1.4.2+corp: 1.4.2+corp is a local build" in message and "--find-links FOLDER" in message
    assert "polars" not in message

    # The host has another version: the job can run, so --env auto leaves it as the host has it.
    present = envcheck.compare("gpu1", local, {"acme-utils": "1.3.0"}, "3.11.7", "3.11.7", origins={})
    acme = next(row for row in present.rows if row.package == "acme-utils")
    assert not acme.blocking and acme.unpinnable and "--env auto" not in acme.fix
    assert envcheck.auto_requirements(present) == ["polars==1.9.0"]


def test_env_auto_never_asks_an_index_for_a_package_installed_from_elsewhere() -> None:
    origins = {
        "gitpkg": "git+https://example.org/gitpkg.git",
        "wheelpkg": "file:///home/u/wheelpkg-1.0-py3-none-any.whl",
    }
    report = envcheck.compare("h", {"gitpkg": "0.3.0", "wheelpkg": "1.0"}, {}, "3.11.7", "3.11.7", origins=origins)
    rows = {row.package: row for row in report.rows}
    assert rows["gitpkg"].fix == "list `gitpkg @ git+https://example.org/gitpkg.git` in --env FILE"
    assert rows["wheelpkg"].unpinnable == f"it was installed here from {origins['wheelpkg']}, not from a package index"
    assert rows["wheelpkg"].fix.startswith("put its wheel on the host")
    with pytest.raises(HostSetupError, match="lacks 2 packages that came from elsewhere"):
        envcheck.auto_requirements(report)


def test_local_origin_reads_where_a_distribution_came_from(
    tmp_path: Path, wheelhouse: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pip records a wheel file given by path (PEP 610's direct_url.json), not one found by name in --find-links."""
    wheel = build_wheel(tmp_path / "loose", "loosepkg", "1.0")
    target = tmp_path / "site-packages"
    for requirement in (["--no-index", wheel], ["--no-index", "--find-links", str(wheelhouse), "tinypkg==2.0"]):
        subprocess.run(
            [sys.executable, "-m", "pip", "-q", "install", "--target", str(target), *requirement], check=True
        )
    monkeypatch.syspath_prepend(str(target))
    assert envcheck.install_origin("loosepkg") == Path(wheel).as_uri()
    assert envcheck.install_origin("tinypkg") is None and envcheck.install_origin("no-such-dist") is None


def test_report_text_and_html_name_the_differences() -> None:
    report = _report()
    text = report.text()
    print("\n" + text)
    lines = text.splitlines()
    assert lines[0] == "host gpu1: python 3.10.12 there, 3.11.7 here"
    assert lines[1].split() == ["package", "here", "host", "fix"]
    polars = next(line for line in lines if "polars" in line)
    assert polars.startswith("* ") and "1.9.0" in polars and "missing" in polars
    keras = next(line for line in lines if " keras " in line)
    assert keras.startswith("  ") and "3.5.0" in keras and "3.6.0" in keras
    assert lines[1].index("here") == polars.index("1.9.0") == keras.index("3.5.0")  # aligned columns
    assert repr(report) == text
    # The differences first, then what matches (patch-only differences say so), in the same table.
    shown = [line.split()[0] for line in lines[2:-1] if not line.startswith("*")]
    assert shown == ["keras", "scikit-learn", "torch", "numpy", "pandas", "tensorflow-cpu"]
    assert next(line for line in lines if " pandas " in line).endswith("matches (only the patch differs)")
    assert [row.package for row in report.matching] == ["numpy", "pandas", "tensorflow-cpu"]
    # The refusal: the differences only, never the matching packages.
    refusal = report.refusal().splitlines()
    assert refusal[0].startswith("nothing was sent: the Python on host gpu1")
    assert [line.split() for line in refusal[1:]] == [line.split() for line in lines if "matches" not in line]

    page = report._repr_html_()
    assert page.count("remote-magic-env-blocking") == 4 and page.count("remote-magic-env-warning") == 3
    assert page.count("remote-magic-env-match") == 3
    assert "<td style='text-align:left'>polars</td>" in page and "3.6.0" in page and "missing" in page
    hostile = envcheck.compare("<b>h</b>", {"a<script>": "1.0"}, {}, "3.11.7", "3.11.7")
    assert "<script>" not in hostile._repr_html_() and "&lt;script&gt;" in hostile._repr_html_()

    class Printer:
        def __init__(self) -> None:
            self.out = ""

        def text(self, value: str) -> None:
            self.out += value

    printer = Printer()
    report._repr_pretty_(printer, False)
    assert printer.out == text


def test_an_installer_left_running_by_a_dead_agent_is_ended_before_the_next_build(tmp_path, wheelhouse: Path) -> None:
    """The connection dropped mid-build: the agent died, its pip ran on. The next build ends it first,
    so two installers never write into one folder."""
    from remote_magic.agent import procs

    root = str(tmp_path)  # a root of its own: this env must be built here, not found from another test
    text = _requirements(wheelhouse, "tinypkg==2.0")
    key = envs.env_key(envs.normalize_requirements(text))
    orphan = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        env=procs.tag_environment(dict(os.environ), f"env-build-{key}"),
        start_new_session=True,
    )
    try:
        result = envs.ensure(root, text)
        assert result.built
        assert orphan.wait(timeout=10) != 0  # ended by a signal, long before its 60 s
    finally:
        orphan.kill()
        orphan.wait()


def test_collect_removes_envs_unused_for_the_period_unless_in_use(tmp_path: Path) -> None:
    """Kept whatever their age: a running or queued job's env, one a live process runs from (a warm runner),
    and one being built or reused (its lock held). A dry run only says what would go."""
    root, now = str(tmp_path), time.time()
    keys = {name: f"{i:016x}" for i, name in enumerate(["old", "recent", "queued", "process", "locked"])}
    for name, key in keys.items():
        env = tmp_path / "envs" / key
        (env / "bin").mkdir(parents=True)
        (env / "bin" / "python").symlink_to(sys.executable)
        (env / "lib.so").write_bytes(b"x" * 10_000)
        (env / envs.READY_FILE).write_text("{}")
        age = 60 if name == "recent" else 2 * 86400
        os.utime(env / envs.READY_FILE, (now - age, now - age))
    python = str(tmp_path / "envs" / keys["process"] / "bin" / "python")
    runner = subprocess.Popen(
        [python, "-c", "print(1, flush=True); input()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert runner.stdout is not None and runner.stdout.readline()  # it runs as the env's python now
    lock = os.open(tmp_path / "envs" / f"{keys['locked']}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        assert envs.collect(root, 3600, {keys["queued"]}, dry_run=True)[0] == [keys["old"]]
        assert (tmp_path / "envs" / keys["old"]).is_dir()
        removed, freed = envs.collect(root, 3600, {keys["queued"]})
    finally:
        os.close(lock)
        runner.communicate(b"\n", timeout=10)
    assert removed == [keys["old"]] and freed >= 10_000
    left = {p.name for p in (tmp_path / "envs").iterdir() if p.is_dir()}
    assert left == set(keys.values()) - {keys["old"]}
    assert envs.collect(root, 3600, set())[0] == sorted([keys["queued"], keys["process"], keys["locked"]])

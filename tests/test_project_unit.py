"""What travels with a job: local modules found from a cell, and the data files of --files.

Real files in tmp_path and real imports; nothing is mocked but the moments the tests must force
(a file changing mid-hash, a read that fails, the hashing counted).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import py_compile
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from remote_magic import project
from remote_magic.agent import digest
from remote_magic.project import (
    FileSet,
    HashCache,
    LocalModule,
    ProjectError,
    collect_files,
    find_local_modules,
    is_local_module,
    local_origin,
    module_files,
)
from remote_magic.project import files as project_files
from remote_magic.project import walk as project_walk

REPO = Path(project.__file__).resolve().parents[2]


def _write(path: Path, text: str = "", mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    if mode is not None:
        path.chmod(mode)
    return path


def _sha(path: Path) -> str:
    return digest.of(path.read_bytes())


def _rels(fileset: FileSet | list[project.ProjectFile]) -> list[str]:
    files = fileset.files if isinstance(fileset, FileSet) else fileset
    return [f.rel for f in files]


@pytest.fixture(autouse=True)
def _no_git_settings_of_this_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """collect_files reads git's global ignore file as git does: keep this machine's out of the tests."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-xdg"))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "no-gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")


@pytest.fixture
def cache(tmp_path: Path) -> HashCache:
    return HashCache(str(tmp_path / "state" / "hashes.sqlite"))


@pytest.fixture
def settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cache files the test has just written (normally a file changed in the last 2 s is hashed every time)."""
    monkeypatch.setattr(project_files, "_RACY_NS", 0)


@pytest.fixture
def code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder on sys.path for the test's modules; every module imported from it is forgotten afterwards."""
    folder = tmp_path / "code"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    before = set(sys.modules)
    yield folder
    for name in set(sys.modules) - before:  # only the test's own: numpy, once imported, cannot be imported again
        module = sys.modules[name]
        places = [getattr(module, "__file__", None) or "", *(getattr(module, "__path__", None) or [])]
        if any(place.startswith(str(folder)) for place in places):
            del sys.modules[name]
    importlib.invalidate_caches()


def _make_project(code: Path) -> None:
    """A package with relative imports that also imports a sibling top-level module absolutely."""
    _write(code / "proj" / "__init__.py", "from .models import build\n")
    _write(
        code / "proj" / "models.py",
        """\
        import json

        import helpers
        from . import layers
        from .layers import dense


        def build():
            return helpers.scale(dense())
        """,
    )
    _write(code / "proj" / "layers.py", "import os\n\ndef dense():\n    return 1\n")
    _write(code / "proj" / "__pycache__" / "models.cpython-311.pyc", "bytecode")
    _write(code / "proj" / "stale.pyc", "bytecode")
    _write(code / "proj" / ".gitignore", "secret.txt\n")
    _write(code / "proj" / "secret.txt", "not for the host")
    _write(code / "helpers.py", "import numpy\n\ndef scale(x):\n    return 2 * x\n")


# -- local modules -----------------------------------------------------------------------------


def test_a_package_the_cell_imports_and_the_helper_it_imports_are_found(code: Path, cache: HashCache) -> None:
    _make_project(code)
    cell = "import json\nimport numpy as np\nfrom proj.models import build\nmodel = build()\n"

    modules = find_local_modules(cell)  # nothing imported yet: found through find_spec, without running them

    assert modules == [
        LocalModule("helpers", str(code / "helpers.py"), str(code)),
        LocalModule("proj", str(code / "proj"), str(code)),
    ]
    assert "proj" not in sys.modules and "helpers" not in sys.modules
    files = module_files(modules, cache)
    assert _rels(files) == ["helpers.py", "proj/.gitignore", "proj/__init__.py", "proj/layers.py", "proj/models.py"]
    for f in files:
        assert f.local == str(code / f.rel)
        assert f.digest == _sha(code / f.rel)
        assert f.size == (code / f.rel).stat().st_size

    importlib.import_module("proj")  # once imported, sys.modules answers the same
    assert find_local_modules(cell) == modules


def test_a_module_only_the_pickler_met_is_found(code: Path) -> None:
    _write(code / "pickled_types.py", "class Config:\n    pass\n")
    _write(code / "pickled_extra" / "__init__.py", "")
    _write(code / "pickled_extra" / "sub.py", "import pickled_types\n")

    modules = find_local_modules(
        "x = 1\n", referenced=["pickled_extra.sub", "__main__", "builtins", "numpy.core.multiarray", "collections", ""]
    )

    assert [m.name for m in modules] == ["pickled_extra", "pickled_types"]  # and what that one imports


def test_standard_library_site_packages_and_remote_magic_are_not_local() -> None:
    import numpy  # noqa: F401  (imported: answered by sys.modules)

    for name in ["json", "os", "sys", "_io", "builtins", "numpy", "numpy.linalg", "pytest", "IPython"]:
        assert is_local_module(name) is None, name
    for name in ["remote_magic", "remote_magic.project", "__main__", "no_such_module_anywhere", "", "not-a-name"]:
        assert is_local_module(name) is None, name
    assert find_local_modules("import json, numpy, remote_magic\nfrom os import path\n") == []
    assert local_origin("json") is None


def test_bytecode_only_modules_are_not_local(code: Path) -> None:
    source = _write(code / "build_src" / "sourceless.py", "X = 1\n")
    py_compile.compile(str(source), cfile=str(code / "sourceless.pyc"))

    assert importlib.util.find_spec("sourceless").origin == str(code / "sourceless.pyc")
    assert is_local_module("sourceless") is None


def test_a_namespace_package_counts_as_local(code: Path) -> None:
    _write(code / "nspkg" / "tools.py", "import helpers2\n")
    _write(code / "helpers2.py", "")

    modules = find_local_modules("from nspkg.tools import x\n")

    assert modules == [
        LocalModule("helpers2", str(code / "helpers2.py"), str(code)),
        LocalModule("nspkg", str(code / "nspkg"), str(code)),
    ]
    assert local_origin("nspkg") == f"the local folder {code / 'nspkg'}"


def test_relative_imports_and_broken_cells_find_nothing(code: Path) -> None:
    _make_project(code)
    assert find_local_modules("from . import proj\nfrom .proj import build\n") == []
    assert find_local_modules("import proj\nthis is not python(\n") == []
    assert find_local_modules("%time import proj\n") == []  # an IPython magic line: the cell is checked elsewhere


def test_modules_option_adds_local_modules_and_refuses_others(code: Path) -> None:
    _make_project(code)

    assert [m.name for m in find_local_modules("x = 1\n", extra=["helpers"])] == ["helpers"]
    assert [m.name for m in find_local_modules("", extra=["proj.layers"])] == ["helpers", "proj"]
    for name in ["numpy", "json", "nothing_like_it", "proj.nothing_like_it"]:
        with pytest.raises(ProjectError) as err:
            find_local_modules("", extra=[name])
        assert str(err.value) == (
            f"--modules: no local module named {name!r} (it is not importable here, or it is installed in "
            f"site-packages, which the host must install itself)"
        )


def test_local_origin_names_the_file(code: Path) -> None:
    _make_project(code)

    assert local_origin("proj.models") == f"the local file {code / 'proj' / 'models.py'}"
    assert local_origin("proj") == f"the local file {code / 'proj' / '__init__.py'}"
    assert local_origin("helpers") == f"the local file {code / 'helpers.py'}"
    assert local_origin("proj.missing") is None
    assert local_origin("helpers.sub") is None
    assert "proj" not in sys.modules  # found without importing anything


def _editable_tools() -> tuple[str, str]:
    """(folder holding setuptools, pip version), or skip: the editable install needs PEP 660 and pip --python."""
    setuptools = pytest.importorskip("setuptools")
    pip = pytest.importorskip("pip")
    if int(setuptools.__version__.split(".")[0]) < 64 or tuple(map(int, pip.__version__.split(".")[:2])) < (22, 3):
        pytest.skip("needs setuptools >= 64 and pip >= 22.3 for an offline editable install")
    return str(Path(setuptools.__file__).parent.parent), pip.__version__


def test_an_editable_install_with_setuptools_finder_is_local(tmp_path: Path) -> None:
    """A real ``pip install -e`` into a throw-away venv.  The package folder (lib/) is mapped to another name
    (mypkg), so setuptools installs its import finder rather than a path entry: only find_spec knows the source."""
    setuptools_dir, _ = _editable_tools()
    src = tmp_path / "mypkg-project"
    _write(
        src / "pyproject.toml",
        """\
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "mypkg"
        version = "0.1"

        [tool.setuptools]
        packages = ["mypkg", "mypkg.sub"]
        package-dir = {"mypkg" = "lib", "mypkg.sub" = "lib/sub"}
        """,
    )
    _write(src / "lib" / "__init__.py", "from .sub import core\n")
    _write(src / "lib" / "sub" / "__init__.py", "")
    _write(src / "lib" / "sub" / "core.py", "import json\n")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--disable-pip-version-check"]
    install += ["--no-index", "--no-build-isolation", "-e", str(src)]
    env = {**os.environ, "PYTHONPATH": setuptools_dir}  # the build backend runs in the new venv
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    finders = list(venv.glob("lib/python*/site-packages/__editable___mypkg_*_finder.py"))
    assert finders, "setuptools did not install its finder; this test would not test it"

    snippet = textwrap.dedent(
        """\
        import json
        from remote_magic.project import HashCache, find_local_modules, local_origin, module_files
        modules = find_local_modules("from mypkg.sub.core import x\\nimport json\\n")
        files = module_files(modules, HashCache(None))
        print(json.dumps({"modules": [list(m.__dict__.values()) for m in modules],
                          "rels": [f.rel for f in files], "origin": local_origin("mypkg.sub.core")}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "REMOTE_MAGIC_DATA_DIR": str(tmp_path / "state")}
    ran = subprocess.run([str(python), "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout)
    assert out["modules"] == [["mypkg", str(src / "lib"), str(src)]]
    # rel starts with the import name, not the folder's name: the host imports mypkg from its module folder
    assert out["rels"] == ["mypkg/__init__.py", "mypkg/sub/__init__.py", "mypkg/sub/core.py"]
    assert out["origin"] == f"the local file {src / 'lib' / 'sub' / 'core.py'}"


# -- --files -----------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """proj/ (a git repository) with notebooks/ (the kernel's cwd) and data/."""
    root = tmp_path / "proj"
    (root / ".git").mkdir(parents=True)
    (root / "notebooks").mkdir()
    _write(root / "data" / "train.csv", "a,b\n1,2\n")
    _write(root / "data" / "test.csv", "a,b\n3,4\n")
    _write(root / "data" / "sub" / "x.npy", "x" * 100)
    _write(root / "data" / "sub" / "deeper" / "y.npy", "y")
    _write(root / "run.sh", "#!/bin/sh\necho hi\n", mode=0o755)
    return root


def test_files_outside_the_cwd_keep_their_layout(tree: Path, cache: HashCache) -> None:
    fs = collect_files("../data/train.csv, ../data/sub ,../run.sh", cwd=str(tree / "notebooks"), cache=cache)

    assert fs.root == str(tree)
    assert fs.cwd == "notebooks"
    assert _rels(fs) == ["data/sub/deeper/y.npy", "data/sub/x.npy", "data/train.csv", "run.sh"]
    by_rel = {f.rel: f for f in fs.files}
    assert by_rel["run.sh"].mode == 0o755  # scripts stay executable
    assert by_rel["data/sub/x.npy"].size == 100
    for f in fs.files:
        assert f.local == str(tree / f.rel)
        assert f.digest == _sha(tree / f.rel)


def test_files_inside_the_cwd_make_the_cwd_the_root(tree: Path, cache: HashCache) -> None:
    fs = collect_files("data/train.csv,data/train.csv,./data/sub/x.npy", cwd=str(tree), cache=cache)
    assert (fs.root, fs.cwd) == (str(tree), "")
    assert _rels(fs) == ["data/sub/x.npy", "data/train.csv"]  # named twice, sent once


def test_no_files_is_an_empty_set(tree: Path) -> None:
    assert collect_files("", cwd=str(tree / "notebooks")) == FileSet([], str(tree / "notebooks"), "")
    assert collect_files(" , ", cwd=str(tree)) == FileSet([], str(tree), "")


def test_globs_tilde_and_absolute_paths(tree: Path, cache: HashCache, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = str(tree / "notebooks")
    assert _rels(collect_files("../data/*.csv", cwd=cwd, cache=cache)) == ["data/test.csv", "data/train.csv"]
    assert _rels(collect_files("../data/**/*.npy", cwd=cwd, cache=cache)) == [
        "data/sub/deeper/y.npy",
        "data/sub/x.npy",
    ]
    assert _rels(collect_files("../data/s*", cwd=cwd, cache=cache)) == ["data/sub/deeper/y.npy", "data/sub/x.npy"]
    assert _rels(collect_files(str(tree / "data" / "t*.csv"), cwd=cwd, cache=cache)) == [
        "data/test.csv",
        "data/train.csv",
    ]
    monkeypatch.setenv("HOME", str(tree))
    assert _rels(collect_files("~/data/train.csv", cwd=cwd, cache=cache)) == ["data/train.csv"]


def test_a_glob_does_not_reach_into_excluded_folders(tree: Path, cache: HashCache) -> None:
    _write(tree / "data" / "__pycache__" / "z.npy", "z")
    _write(tree / "data" / ".ipynb_checkpoints" / "z.npy", "z")
    assert "data/__pycache__/z.npy" not in _rels(collect_files("data/**/*.npy", cwd=str(tree), cache=cache))
    assert _rels(collect_files("data/__pycache__/*.npy", cwd=str(tree), cache=cache)) == ["data/__pycache__/z.npy"]


def test_gitignore_rules_are_honoured_in_folder_walks(tree: Path, cache: HashCache) -> None:
    _write(tree / ".gitignore", "*.tmp\n# a comment\n\n/data/big/\n")  # the repository root's rules apply too
    _write(tree.parent / ".gitignore", "*.csv\n")  # above the repository: not ours
    data = tree / "data"
    _write(
        data / ".gitignore",
        """\
        *.log
        !keep.log
        cache/
        /anchored.txt
        sub/mid.txt
        **/deep.bin
        raw/**
        \\#hash.txt
        """,
    )
    for rel in ["a.log", "keep.log", "x.tmp", "cache/c.txt", "nested/cache/c.txt", "anchored.txt"]:
        _write(data / rel, rel)
    for rel in ["nested/anchored.txt", "sub/mid.txt", "nested/sub/mid.txt", "q/r/deep.bin", "raw/s/t.txt"]:
        _write(data / rel, rel)
    _write(data / "big" / "huge.bin", "huge")
    _write(data / "other" / "cache", "a file named cache: 'cache/' is for folders only")
    _write(data / "#hash.txt", "escaped")
    for skipped in [".venv/bin/python", "__pycache__/m.pyc", ".ipynb_checkpoints/n.ipynb"]:  # .git: a nested repo
        _write(data / skipped, "skipped")
    _write(data / "nested" / ".gitignore", "!*.log\n")  # a deeper file re-includes what a shallower one ignored
    _write(data / "nested" / "n.log", "n")

    fs = collect_files("data", cwd=str(tree), cache=cache)

    assert _rels(fs) == sorted(
        [
            "data/.gitignore",
            "data/keep.log",
            "data/nested/.gitignore",
            "data/nested/anchored.txt",
            "data/other/cache",
            "data/nested/n.log",
            "data/nested/sub/mid.txt",
            "data/sub/x.npy",
            "data/sub/deeper/y.npy",
            "data/test.csv",
            "data/train.csv",
        ]
    )


def test_a_file_named_explicitly_travels_even_if_ignored(tree: Path, cache: HashCache) -> None:
    _write(tree / ".gitignore", "*.csv\nsub/\n")
    assert _rels(collect_files("data/train.csv", cwd=str(tree), cache=cache)) == ["data/train.csv"]
    assert _rels(collect_files("data/*.csv", cwd=str(tree), cache=cache)) == ["data/test.csv", "data/train.csv"]
    assert _rels(collect_files("data/sub", cwd=str(tree), cache=cache)) == ["data/sub/deeper/y.npy", "data/sub/x.npy"]


def test_a_named_folder_whose_files_are_all_ignored_is_an_error(tree: Path, cache: HashCache) -> None:
    _write(tree / ".gitignore", "*.csv\nsub/\n")
    with pytest.raises(ProjectError, match=r"every file in the folder data is ignored by a \.gitignore") as err:
        collect_files("data", cwd=str(tree), cache=cache)
    assert "data/*.csv" in str(err.value)  # the fix: name them
    (tree / "empty").mkdir()
    with pytest.raises(ProjectError, match=r"the folder empty has no files to send"):
        collect_files("empty", cwd=str(tree), cache=cache)


def test_a_nested_repository_has_its_own_rules(tree: Path, cache: HashCache) -> None:
    _write(tree / ".gitignore", "*.txt\n")
    _write(tree / "data" / "vendored" / ".git" / "HEAD", "ref")
    _write(tree / "data" / "vendored" / "notes.txt", "kept: the outer rules stop at the inner repository")
    _write(tree / "data" / "outer.txt", "ignored")
    rels = _rels(collect_files("data", cwd=str(tree), cache=cache))
    assert "data/vendored/notes.txt" in rels and "data/outer.txt" not in rels
    assert "data/vendored/.git/HEAD" not in rels


def test_outside_a_repository_rules_above_the_layout_root_are_not_read(tmp_path: Path, cache: HashCache) -> None:
    _write(tmp_path / ".gitignore", "*.csv\n")
    _write(tmp_path / "work" / "data" / "a.csv", "a")
    assert _rels(collect_files("data", cwd=str(tmp_path / "work"), cache=cache)) == ["data/a.csv"]


@pytest.fixture
def git_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A home of its own for git's global settings, read the same way by git and by collect_files."""
    home, xdg = tmp_path / "home", tmp_path / "home" / ".config"
    home.mkdir()
    env = {"HOME": str(home), "XDG_CONFIG_HOME": str(xdg), "GIT_CONFIG_NOSYSTEM": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("GIT_CONFIG_GLOBAL", raising=False)
    return {**os.environ, **env}


def _git(env: dict[str, str], repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout


def _not_ignored_by_git(env: dict[str, str], repo: Path, folder: str) -> list[str]:
    return sorted(_git(env, repo, "ls-files", "--others", "--exclude-standard", "--", folder).split())


@pytest.mark.parametrize("where", ["default", "home", "repository"])
def test_git_info_exclude_and_core_excludes_file_leave_out_what_git_leaves_out(
    tmp_path: Path, cache: HashCache, git_home: dict[str, str], where: str
) -> None:
    """A real repository: ``.git/info/exclude`` and ``core.excludesFile`` (git's default file, one named in
    ``~/.gitconfig``, one named in the repository's config) leave out of --files exactly what git leaves out."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(git_home, repo, "init", "-q")
    for rel in ["a.csv", "b.log", "c.tmp", "keep.tmp", "sub/d.bak", "sub/e.txt", "private/f.txt", "x.npy"]:
        _write(repo / "data" / rel, rel)
    _write(repo / "data" / ".gitignore", "!keep.tmp\n")  # a .gitignore outranks both other sources
    _write(repo / ".git" / "info" / "exclude", "# local only\n*.log\nprivate/\n")
    home = Path(git_home["HOME"])
    if where == "default":
        _write(home / ".config" / "git" / "ignore", "*.tmp\n*.bak\n")
    elif where == "home":
        _write(home / ".gitconfig", '[user]\n\tname = x\n[core]\n\texcludesFile = "~/my ignore" ; a comment\n')
        _write(home / "my ignore", "*.tmp\n*.bak\n")
        _write(home / ".config" / "git" / "ignore", "*.csv\n")  # not read: core.excludesFile names another
    else:
        _write(home / ".gitconfig", "[core]\n\texcludesfile = ~/unused\n")
        _git(git_home, repo, "config", "core.excludesFile", str(tmp_path / "repo-ignore"))
        _write(tmp_path / "repo-ignore", "*.tmp\nsub/*.bak\n")
    expected = _not_ignored_by_git(git_home, repo, "data")
    assert "data/b.log" not in expected and "data/c.tmp" not in expected and "data/keep.tmp" in expected
    assert _rels(collect_files("data", cwd=str(repo), cache=cache)) == expected


def test_a_missing_path_names_itself_and_the_folder(tree: Path) -> None:
    cwd = tree / "notebooks"
    with pytest.raises(ProjectError) as err:
        collect_files("../data/train.csv,../data/trian.csv", cwd=str(cwd))
    assert str(err.value) == f"--files: no such file or folder: ../data/trian.csv (relative to {cwd})"
    with pytest.raises(ProjectError) as err:
        collect_files("../data/*.parquet", cwd=str(cwd))
    assert str(err.value) == f"--files: nothing matches ../data/*.parquet (relative to {cwd})"
    with pytest.raises(ProjectError) as err:
        collect_files(str(tree / "nope"), cwd=str(cwd))
    assert str(err.value) == f"--files: no such file or folder: {tree / 'nope'}"


def test_a_path_sharing_only_the_filesystem_root_is_refused(tree: Path) -> None:
    elsewhere = os.path.realpath(os.__file__)  # the standard library: somewhere else on this machine
    if os.path.commonpath([elsewhere, str(tree)]) != "/":
        pytest.skip("the standard library and tmp_path share a folder here")
    with pytest.raises(ProjectError) as err:
        collect_files(f"../data/train.csv,{elsewhere}", cwd=str(tree / "notebooks"))
    message = str(err.value)
    assert f"--files: {elsewhere}" in message
    assert f"shares no folder with the working directory {tree / 'notebooks'}" in message
    assert "copy it into the project, or use --workdir" in message


def test_symlinks_files_followed_folders_without_looping(tree: Path, tmp_path: Path, cache: HashCache) -> None:
    outside = _write(tmp_path / "storage" / "weights.bin", "w" * 10)
    (tree / "data" / "weights.bin").symlink_to(outside)
    (tree / "data" / "loop").symlink_to(tree / "data")  # a folder that contains itself
    (tree / "data" / "dangling").symlink_to(tmp_path / "gone")
    (tree / "data" / "alias").symlink_to(tree / "data" / "sub" / "deeper")

    fs = collect_files("data", cwd=str(tree), cache=cache)

    rels = _rels(fs)
    assert "data/weights.bin" in rels and "data/dangling" not in rels
    assert "data/alias/y.npy" in rels and "data/sub/deeper/y.npy" in rels  # same content: one blob, two places
    assert not any(r.startswith("data/loop/") for r in rels)
    weights = next(f for f in fs.files if f.rel == "data/weights.bin")
    assert (weights.local, weights.size, weights.digest) == (str(tree / "data" / "weights.bin"), 10, _sha(outside))

    (tree / "notebooks" / "w.bin").symlink_to(outside)  # a named symlink keeps the name it was given
    fs = collect_files("w.bin", cwd=str(tree / "notebooks"), cache=cache)
    assert (fs.root, _rels(fs)) == (str(tree / "notebooks"), ["w.bin"])


def test_a_file_that_changes_while_hashed_is_an_error(
    tree: Path, cache: HashCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tree / "data" / "train.csv"

    class Appending:
        """sha256, but the file grows after the first chunk is read (a writer still at work)."""

        def __init__(self) -> None:
            self._h = hashlib.sha256()

        def update(self, chunk: bytes) -> None:
            with open(target, "a") as f:
                f.write("5,6\n")
            self._h.update(chunk)

        def hexdigest(self) -> str:
            return self._h.hexdigest()

    monkeypatch.setattr(project_files, "_new_hasher", Appending)
    with pytest.raises(ProjectError) as err:
        collect_files("data/train.csv", cwd=str(tree), cache=cache)
    assert str(err.value) == (
        f"{target} changed while it was being read; wait until whatever writes it has finished, then run the cell again"
    )


def test_an_unreadable_file_is_an_error(tree: Path, cache: HashCache, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tree / "data" / "train.csv"
    if os.geteuid() != 0:
        target.chmod(0)
    else:  # root reads everything: make the read fail the way chmod 0 would for anyone else

        def refuse(path: str, *args: object, **kwargs: object) -> object:
            if path == str(target):
                raise PermissionError(13, "Permission denied", path)
            return open(path, *args, **kwargs)  # type: ignore[call-overload]

        monkeypatch.setattr(project_files, "open", refuse, raising=False)
    with pytest.raises(ProjectError) as err:
        collect_files("data", cwd=str(tree), cache=cache)
    assert str(err.value).startswith(f"cannot read {target} (Permission denied); make it readable")


def test_the_hash_cache_hashes_unchanged_files_once(
    tree: Path, tmp_path: Path, cache: HashCache, settled: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[str] = []
    real = project_files._hash_file

    def counting(path: str, st: os.stat_result) -> str:
        hashed.append(path)
        return real(path, st)

    monkeypatch.setattr(project_files, "_hash_file", counting)
    first = collect_files("data", cwd=str(tree), cache=cache)
    assert len(hashed) == 4

    hashed.clear()
    again = collect_files("data", cwd=str(tree), cache=HashCache(cache.path))  # another kernel, same database
    assert hashed == []
    assert again == first

    edited = tree / "data" / "sub" / "x.npy"
    edited.write_text("z" * 100)  # same size: the times tell
    hashed.clear()
    after = collect_files("data", cwd=str(tree), cache=cache)
    assert hashed == [str(edited)]
    assert next(f.digest for f in after.files if f.rel == "data/sub/x.npy") == _sha(edited)

    hashed.clear()
    assert cache.digest(str(edited)) == _sha(edited) and hashed == []
    assert cache.digests([str(edited), str(tree / "run.sh")]) == {
        str(edited): _sha(edited),
        str(tree / "run.sh"): _sha(tree / "run.sh"),
    }
    assert hashed == [str(tree / "run.sh")]


def test_a_file_written_just_now_is_not_cached(tree: Path, cache: HashCache, monkeypatch: pytest.MonkeyPatch) -> None:
    """Within one mtime tick a same-size rewrite would look unchanged, so fresh files are hashed every time."""
    hashed: list[str] = []
    real = project_files._hash_file
    monkeypatch.setattr(project_files, "_hash_file", lambda path, st: hashed.append(path) or real(path, st))
    fresh = _write(tree / "fresh.txt", "new")
    cache.digest(str(fresh))
    cache.digest(str(fresh))
    assert hashed == [str(fresh), str(fresh)]


def test_a_damaged_or_unusable_database_only_means_no_cache(tmp_path: Path, tree: Path, settled: None) -> None:
    damaged = tmp_path / "damaged.sqlite"
    damaged.write_bytes(b"this is not a database" * 100)
    target = str(tree / "data" / "train.csv")
    assert HashCache(str(damaged)).digest(target) == _sha(Path(target))
    assert (tmp_path / "damaged.sqlite.damaged").exists()  # moved aside; a fresh cache took its place
    assert HashCache(str(damaged))._lookup([(target, os.stat(target))]) == {0: _sha(Path(target))}

    folder_not_file = tmp_path / "a-folder"
    folder_not_file.mkdir()
    assert HashCache(str(folder_not_file)).digest(target) == _sha(Path(target))
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("x")
    assert HashCache(str(blocked / "hashes.sqlite")).digest(target) == _sha(Path(target))


def test_the_default_database_lives_in_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMOTE_MAGIC_DATA_DIR", str(tmp_path / "data"))
    assert HashCache().path == str(tmp_path / "data" / "hashes.sqlite")


def test_two_kernels_share_the_database(tmp_path: Path, settled: None) -> None:
    files = [_write(tmp_path / "f" / f"{i}.txt", str(i)) for i in range(200)]
    caches = [HashCache(str(tmp_path / "hashes.sqlite")) for _ in range(2)]
    results: list[dict[str, str]] = []
    errors: list[BaseException] = []

    def work(cache: HashCache, order: list[Path]) -> None:
        try:
            for _ in range(3):
                results.append(cache.digests([str(p) for p in order]))
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [
        threading.Thread(target=work, args=(caches[0], files)),
        threading.Thread(target=work, args=(caches[1], files[::-1])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    expected = {str(p): _sha(p) for p in files}
    assert all(result == expected for result in results) and len(results) == 6


def test_twenty_thousand_small_files(
    tmp_path: Path, cache: HashCache, settled: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "many"
    for d in range(100):
        folder = root / "data" / f"d{d:03}"
        folder.mkdir(parents=True)
        for i in range(200):
            (folder / f"{i:03}.txt").write_text(f"{d}-{i}")

    fs = collect_files("data", cwd=str(root), cache=cache)

    assert len(fs.files) == 20_000
    assert _rels(fs) == sorted(_rels(fs))
    some = fs.files[12_345]
    assert some.rel == "data/d061/145.txt"
    assert some.digest == digest.of(b"61-145") and some.size == len("61-145")

    hashed: list[str] = []
    monkeypatch.setattr(project_files, "_hash_file", lambda path, st: hashed.append(path) or "")
    assert collect_files("data", cwd=str(root), cache=cache) == fs
    assert hashed == []


# -- the .gitignore matcher --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "path", "is_dir", "ignored"),
    [
        ("*.csv", "a.csv", False, True),
        ("*.csv", "deep/er/a.csv", False, True),
        ("*.csv", "a.csvx", False, None),
        ("a?c", "abc", False, True),
        ("a?c", "a/c", False, None),
        ("[ab].txt", "b.txt", False, True),
        ("[!ab].txt", "c.txt", False, True),
        ("[!ab].txt", "a.txt", False, None),
        ("[0-9].txt", "7.txt", False, True),
        ("build/", "build", True, True),
        ("build/", "build", False, None),
        ("build/", "x/build", True, True),
        ("/build", "build", True, True),
        ("/build", "x/build", True, None),
        ("doc/*.txt", "doc/a.txt", False, True),
        ("doc/*.txt", "doc/x/a.txt", False, None),
        ("doc/*.txt", "x/doc/a.txt", False, None),
        ("**/logs", "logs", True, True),
        ("**/logs", "a/b/logs", True, True),
        ("a/**/b", "a/b", False, True),
        ("a/**/b", "a/x/y/b", False, True),
        ("out/**", "out/a/b.txt", False, True),
        ("out/**", "out", True, None),
        ("foo**bar", "fooXbar", False, True),
        ("foo**bar", "foo/bar", False, None),
        ("\\#lit", "#lit", False, True),
        ("\\!lit", "!lit", False, True),
        ("trail\\ ", "trail ", False, True),
        ("trail   ", "trail", False, True),
        ("# comment", "# comment", False, None),
        ("a[b", "a[b", False, True),
        ("!*.csv", "a.csv", False, False),
    ],
)
def test_gitignore_rules(rule: str, path: str, is_dir: bool, ignored: bool | None) -> None:
    rules = project_walk._IgnoreFile("/base", [rule])
    assert rules.verdict(f"/base/{path}", is_dir) is ignored


def test_the_last_matching_rule_wins() -> None:
    rules = project_walk._IgnoreFile("/", ["*.log", "!keep.log", "keep.log", "!*/keep.log"])
    assert rules.verdict("/keep.log", False) is True
    assert rules.verdict("/sub/keep.log", False) is False
    assert rules.verdict("/other.log", False) is True


def test_the_cwd_defaults_to_the_kernels(tree: Path, cache: HashCache, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree / "notebooks")
    fs = collect_files("../data/train.csv", cache=cache)
    assert (fs.root, fs.cwd, _rels(fs)) == (str(tree), "notebooks", ["data/train.csv"])


def test_a_package_pip_put_in_a_folder_of_its_own_is_installed_not_local(tmp_path, monkeypatch) -> None:
    """`pip install --target K` makes no site-packages folder, but its packages are installed ones: never shipped."""
    from wheels import build_wheel

    wheel = build_wheel(tmp_path / "wheels", "targetpkg", "1.0")
    target = tmp_path / "K"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--target", str(target), str(wheel)], check=True
    )
    (tmp_path / "mine.py").write_text("import targetpkg\n")
    monkeypatch.syspath_prepend(str(target))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert project.is_local_module("targetpkg") is None
    assert [m.name for m in project.find_local_modules("import mine\n")] == ["mine"]

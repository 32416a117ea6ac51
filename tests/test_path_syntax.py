"""One path syntax for --files, --fetch, --modules and %remote_fetch: shell-like quoting, escapes, globs, non-ASCII.

IPython splits the magic's line (quotes kept in the word, so ``--slurm "--mem=8G"`` works); ``path_list`` reads
each option's value as a shell would, and refuses what it cannot read with the option and the value named.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run
from IPython.core.error import UsageError
from IPython.utils.process import arg_split

from remote_magic.magic_options import _words, path_list, quoted_paths


@pytest.mark.parametrize(
    ("value", "items"),
    [
        ("data/train.csv", ["data/train.csv"]),
        ("a.csv,b.csv", ["a.csv", "b.csv"]),
        ("a.csv, b.csv ,c.csv", ["a.csv", "b.csv", "c.csv"]),
        ("a.csv b.csv", ["a.csv", "b.csv"]),
        ('"data/my file é.csv"', ["data/my file é.csv"]),
        ("'x, y.txt',z.txt", ["x, y.txt", "z.txt"]),
        ('"x, y.txt" z.txt', ["x, y.txt", "z.txt"]),
        (r"a\ b.csv", ["a b.csv"]),
        (r"a\,b.csv", ["a,b.csv"]),
        (r'"say \"hi\".txt"', ['say "hi".txt']),
        (r"'back\slash'", [r"back\slash"]),
        (r'"back\slash"', [r"back\slash"]),
        ('data/"my file".csv', ["data/my file.csv"]),
        ("données/été.npy", ["données/été.npy"]),
        ('"out dir/*.txt"', ["out dir/*.txt"]),
        ("logs/**,*.keras,run[0-9].txt,?.csv", ["logs/**", "*.keras", "run[0-9].txt", "?.csv"]),
        ("'logs/**,model.keras'", ["logs/**,model.keras"]),  # quoted: one item, as in a shell
    ],
)
def test_a_value_is_read_as_a_shell_reads_it(value: str, items: list[str]) -> None:
    assert path_list(value, "--files") == items


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("'data/a.csv", "an unclosed ' quote"),
        ('"data/a.csv', 'an unclosed " quote'),
        ("a.csv,,b.csv", "an empty item before a comma"),
        (",a.csv", "an empty item before a comma"),
        ("a.csv,", "an empty item after the last comma"),
        ('""', "an empty item"),
        ("a.csv ''", "an empty item"),
        ("a.csv\\", "ends with a backslash"),
        ("  ", "no paths in it"),
    ],
)
@pytest.mark.parametrize("option", ["--files", "--fetch", "--modules"])
def test_the_same_errors_for_every_option_name_it_and_the_value(value: str, problem: str, option: str) -> None:
    with pytest.raises(UsageError) as err:
        path_list(value, option)
    assert str(err.value).startswith(f"{option} {value}: ")
    assert problem in str(err.value) and "nothing was sent" in str(err.value)


def test_a_backslash_escaped_space_stays_in_its_word_and_the_rest_of_the_line_splits_as_ipython_does() -> None:
    line = '--files a\\ b.csv,c.csv --slurm "--mem=8G" --fetch "out dir/*.txt",\'x,y\' --name x\\\\ y --modules \'m'
    assert _words(line) == [
        "--files",
        r"a\ b.csv,c.csv",
        "--slurm",
        '"--mem=8G"',
        "--fetch",
        "\"out dir/*.txt\",'x,y'",
        "--name",
        "x\\\\",  # an escaped backslash escapes no space
        "y",
        "--modules",
        "'m",  # unclosed: left for path_list to name
    ]
    assert _words(r"--files a\  b") == ["--files", "a\\ ", "b"]
    assert arg_split(line, strict=False)[:2] == ["--files", "a\\"]  # what IPython alone makes of it
    assert path_list(r"a\ b.csv,c.csv", "--files") == ["a b.csv", "c.csv"]


@pytest.mark.parametrize("paths", [["a.csv"], ["logs/**", "model.keras"], ["my file é.csv", "it's, here", r"a\b"]])
def test_paths_written_back_read_back_the_same(paths: list[str]) -> None:
    assert path_list(quoted_paths(paths), "%remote_fetch") == paths


@pytest.fixture
def project(ip, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:  # type: ignore[no-untyped-def]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "my file é.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    (tmp_path / "data" / "other, one.txt").write_text("other", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_quoted_non_ascii_path_with_a_space_ships_and_a_quoted_glob_fetches(ip, project: Path) -> None:
    cell = (
        '%%remote_train --host local --files "data/my file é.csv",data/other\\,\\ one.txt --fetch "out dir/*.txt"\n'
        "import os\n"
        "text = open('data/my file é.csv', encoding='utf-8').read()\n"
        "other = open('data/other, one.txt').read()\n"
        "os.makedirs('out dir', exist_ok=True)\n"
        "open('out dir/résumé.txt', 'w', encoding='utf-8').write('done é')\n"
    )
    result = run(ip, cell)
    assert result.success, result.error_in_exec
    assert ip.user_ns["text"] == "a,b\n1,2\n" and ip.user_ns["other"] == "other"
    assert (project / "out dir" / "résumé.txt").read_text(encoding="utf-8") == "done é"


def test_an_escaped_space_and_a_quoted_glob_ship_too(ip, project: Path) -> None:
    cell = (
        '%%remote_train --host local --files "data/*, one.txt",data/my\\ file\\ é.csv\n'
        "text = open('data/my file é.csv', encoding='utf-8').read()\nother = open('data/other, one.txt').read()\n"
    )
    result = run(ip, cell)
    assert result.success, result.error_in_exec
    assert ip.user_ns["text"] == "a,b\n1,2\n" and ip.user_ns["other"] == "other"


def test_a_missing_path_is_named_without_its_quotes(ip, project: Path) -> None:
    result = run(ip, '%%remote_train --host local --files "data/no file é.csv"\nx = 1\n')
    assert isinstance(result.error_in_exec, UsageError)
    assert "--files: no such file or folder: data/no file é.csv (relative to" in str(result.error_in_exec)


@pytest.mark.parametrize("option", ["--files", "--fetch", "--modules"])
def test_an_unclosed_quote_stops_the_cell_before_anything_runs(ip, project: Path, option: str) -> None:
    result = run(ip, f"%%remote_train --host local {option} 'data/my,x\nran = True\n")
    assert isinstance(result.error_in_exec, UsageError), result.error_in_exec
    assert f"{option} 'data/my,x: an unclosed ' quote" in str(result.error_in_exec)
    assert "ran" not in ip.user_ns

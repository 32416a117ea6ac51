"""The magics' options: declared here in groups, checked here wherever no host is needed; hints phrased as magics.

A user's mistake is a ``UsageError`` raised before anything is sent: a value
that would not stay on one line (``parse``), a job id that cannot be one,
options that do not go together.  What needs the host (its GPUs, whether it
is a Slurm host) is checked by ``session.request``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, argument_group
from IPython.utils.process import arg_split

from . import session
from .agent import protocol
from .session.request import JobOptions, RequestError
from .sweep import MODES, SweepError, expand_grid
from .wire import compression


@contextlib.contextmanager
def usage_errors(*kinds: type[Exception]) -> Iterator[None]:
    """The user's mistakes that a layer below reports as ``kinds``, shown as IPython shows a UsageError."""
    try:
        yield
    except kinds as exc:
        raise UsageError(str(exc)) from None


def _stacked(*decorators: Any) -> Callable[[Any], Any]:
    """Several ``@argument``s as one decorator (as IPython's ``script_args``), read in the order given."""

    def apply(func: Any) -> Any:
        for decorator in reversed(decorators):  # the one nearest the function comes first
            func = decorator(func)
        return func

    return apply


host_argument = argument(
    "--host",
    help="an alias from ~/.ssh/config, or user@host[:port]; default: RemoteMagics.default_host "
    "('local' runs the job in a subprocess on this machine)",
)
job_argument = argument("job", help="the job id, as shown by %%remote_status")

attach_arguments = _stacked(
    argument("job", help="the job id, as shown by %%remote_status, or a sweep's id (sweep-...)"),
    argument(
        "--checkpoint",
        action="store_true",
        help="inject the model from the job's last checkpoint (for a job that was killed or is still running)",
    ),
    argument("--as", dest="as_name", metavar="NAME", help="for a sweep: the name of the sweep object injected"),
)
gc_arguments = _stacked(
    argument(
        "--older-than",
        default="7d",
        help="age of finished jobs to remove, and of environments no job used since: 30m, 12h, 7d, 0 (default 7d)",
    ),
    argument(
        "--include-unfetched", action="store_true", help="also remove finished jobs whose outputs were never fetched"
    ),
    argument("--dry-run", action="store_true", help="only say what would be removed"),
)

# %%remote_train's own options, then its option groups: an argument_group holds the arguments below it, so the
# groups go last.
train_arguments = _stacked(
    argument("--python", help="the Python interpreter on the host (default: python3; 'local' uses this kernel's)"),
    argument("--out", help="comma-separated names to bring back (default: what the cell assigns or trains)"),
    argument("--name", help="a name for the job, shown by %%remote_status"),
    argument(
        "--detach",
        action="store_true",
        help="return at once; the job runs on, its panel updates while the kernel is idle, "
        "and its outputs are injected when it ends",
    ),
    argument("--no-inject", action="store_true", help="do not inject the outputs of a detached job when it ends"),
    argument(
        "--checkpoint-every",
        type=int,
        default=1,
        metavar="N",
        help="save the model being trained every N epochs on the host (0: never); a killed job still yields it",
    ),
    argument("--backend", choices=session.KERAS_BACKENDS, help="the job's Keras backend (default: this kernel's)"),
    argument(
        "--compress",
        choices=compression.MODES,
        help="compress uploads with zstd: 'auto' (default: only on a slow link with compressible data), 'zstd', 'none'",
    ),
)
project_options = _stacked(
    argument_group("project", "what travels with the cell, and what comes back besides its variables"),
    argument(
        "--files",
        metavar="PATHS",
        help="comma-separated files, folders and globs (relative to the working folder, .. allowed) that travel "
        "with the job and appear on the host in the same layout, so relative paths in the cell work unchanged",
    ),
    argument(
        "--workdir", metavar="PATH", help="run the cell in this folder on the host (data that already lives there)"
    ),
    argument(
        "--fetch",
        metavar="PATTERNS",
        help="comma-separated globs of files the cell writes (model.keras, logs/**) to bring back into this "
        "working folder when the job ends",
    ),
    argument("--fetch-overwrite", action="store_true", help="let --fetch replace local files with other content"),
    argument(
        "--modules",
        metavar="NAMES",
        help="comma-separated local modules to send that the automatic detection cannot see",
    ),
    argument(
        "--env",
        metavar="FILE|auto",
        help="run in a host environment built (once, then cached) from a requirements file, or from this "
        "kernel's versions of the packages the host lacks ('auto')",
    ),
)
gpu_options = _stacked(
    argument_group("GPU", "the host's GPU queue gives each job its GPUs alone; on a Slurm host, Slurm does"),
    argument(
        "--gpus",
        metavar="N|all",
        help="how many of the host's GPUs the job holds, alone (default: 1 on a host with GPUs, 0 without); "
        "the job waits in the host's queue until they are free",
    ),
    argument("--gpu-ids", metavar="IDS", help="exactly these GPUs of the host, e.g. 2,3"),
)
sweep_options = _stacked(
    argument_group("sweep", "--sweep runs the cell once per set of parameters; the others shape the sweep"),
    argument(
        "--sweep",
        metavar="GRID",
        help="run the cell once per set of parameters in the kernel variable GRID, each trial a job of its own: "
        "a dict of lists (every combination) or a list of dicts (one per trial); the names need not exist here",
    ),
    argument(
        "--parallel",
        type=int,
        metavar="K",
        help="at most K trials run at once, kept by the host (default: as many as the host's GPUs "
        "allow at --gpus each; 1 on a host without GPUs)",
    ),
    argument(
        "--metric",
        metavar="NAME",
        help="the metric that ranks the trials (default: the first validation metric, val_loss if logged)",
    ),
    argument(
        "--mode",
        choices=MODES,
        help="whether the lowest or highest --metric is best (default: max for accuracy-like names, min for losses)",
    ),
    argument(
        "--as",
        dest="as_name",
        metavar="NAME",
        help="the name of the sweep object injected when it ends (default: sweep)",
    ),
)
slurm_options = _stacked(
    argument_group("Slurm", "on a host with 'scheduler': 'slurm': the job goes through sbatch"),
    argument("--time", metavar="LIMIT", help="the job's time limit, e.g. 2:00:00 (Slurm's --time)"),
    argument("--partition", help="the partition to run in (default: the host setting)"),
    argument(
        "--tasks",
        type=int,
        metavar="N",
        help="run the cell as N tasks under srun (RANK, WORLD_SIZE, MASTER_ADDR... set for PyTorch DDP and "
        "keras.distribution); task 0 streams and brings back the outputs",
    ),
    argument("--nodes", type=int, metavar="M", help="spread --tasks over M nodes"),
    argument("--slurm", metavar="ARGS", help='more sbatch options for this job, e.g. "--mem=8G"'),
)


class MagicHints:
    """What to type to act on a job later: these magics."""

    def attach(self, job_id: str, host: str) -> str:
        return f"`%remote_attach {job_id} --host {host}` follows it and fetches its outputs"

    def detail(self, job_id: str, host: str) -> str:
        return f"its last output is in `%remote_status {job_id} --host {host}`"

    def checkpoint(self, job_id: str, host: str) -> str:
        return f"`%remote_attach {job_id} --host {host} --checkpoint` brings back the model of its last checkpoint"

    def fetch(self, job_id: str, host: str, patterns: list[str]) -> str:
        return f"the files stay on the host: `%remote_fetch {job_id} {quoted_paths(patterns)} --host {host}` gets them"


def parse(magic: Any, line: str) -> Any:
    """The magic's options, each refused before anything is sent when it would not stay on one line."""
    args = magic.parser.parse_args(_words(line))
    options = {action.dest: (action.option_strings or [action.dest])[0] for action in magic.parser._actions}
    for dest, value in vars(args).items():
        problem = session.control_problem(value) if isinstance(value, str) else None
        if problem:
            shown = value.strip("'\"")  # as typed, without the quotes around it
            raise UsageError(
                f"{options.get(dest, dest)} {shown!r} has {problem} in it: {session.ONE_LINE}. Give it on one line, "
                "without control characters; nothing was sent"
            )
    return args


def _words(line: str) -> list[str]:
    """IPython's split of a magic's line, with what a shell would keep in one word kept in one.

    IPython splits the line as Python's non-POSIX ``shlex`` does: quotes stay in the word (``--slurm "--mem=8G"``
    relies on it), a backslash is no escape and a quoted part ends its word, so ``a\\ b.csv`` arrives as ``a\\``
    and ``b.csv``, and ``"a b.csv",c.csv`` as ``"a b.csv"`` and ``,c.csv``. Only those are undone here: words
    with no space between them in the line are one, and so are words that a backslash-escaped space joins; the
    quotes and escapes stay in the value for ``path_list``. An unclosed quote stays in its word, for the option
    that reads it to name.
    """
    words: list[str] = []
    cursor = 0
    for word in arg_split(line, strict=False):
        at = line.find(word, cursor)
        gap = line[cursor:at] if at >= 0 else " "
        escaped = bool(words) and (len(words[-1]) - len(words[-1].rstrip("\\"))) % 2 == 1 and gap[:1].isspace()
        if words and at >= 0 and (gap == "" or (escaped and len(gap) == 1)):
            words[-1] += gap + word
        else:
            if escaped:
                words[-1] += gap[0]
            words.append(word)
        cursor = at + len(word) if at >= 0 else cursor
    return words


def path_list(text: str, option: str) -> list[str]:
    """The paths, globs or names of one option's value (``--files``, ``--fetch``, ``--modules``), as a shell reads them.

    Items are separated by commas or spaces. Single quotes keep everything inside; double quotes keep everything
    but ``\\"`` and ``\\\\``; outside quotes a backslash keeps the next character (``a\\ b.csv``). So
    ``"my file é.csv"``, ``'x, y.txt'`` and ``a\\ b.csv`` are each one item. Globs (``*``, ``?``, ``[...]``, ``**``)
    are kept, quoted or not, for the code that expands them. An unclosed quote, a trailing backslash, an empty item
    (``a,,b``, ``""``) or a value with no item is a ``UsageError`` naming ``option`` and the value as it arrived.
    """
    items: list[str] = []
    word: list[str] = []
    in_word = False  # a character or a quote seen since the last separator
    since_comma = False  # an item ended since the last comma (or the start)
    quote = ""
    chars = iter(text)

    def refused(problem: str) -> UsageError:
        return UsageError(f"{option} {text}: {problem}; nothing was sent")

    def end_word() -> None:
        nonlocal in_word, since_comma
        if in_word:
            if not word:
                raise refused("an empty item (\"\" or '')")
            items.append("".join(word))
            word.clear()
            in_word, since_comma = False, True

    for char in chars:
        if quote:
            quote = _inside_quotes(char, quote, chars, word)
        elif char in "'\"":
            quote, in_word = char, True
        elif char == "\\":
            following = next(chars, None)
            if following is None:
                raise refused("it ends with a backslash, which escapes nothing; quote the path instead")
            word.append(following)
            in_word = True
        elif char == ",":
            end_word()
            if not since_comma:
                raise refused(
                    "an empty item before a comma; give one path between each two commas, none before the first"
                )
            since_comma = False
        elif char.isspace():
            end_word()
        else:
            word.append(char)
            in_word = True
    if quote:
        raise refused(f"an unclosed {quote} quote; close it, or escape a literal one as \\{quote}")
    end_word()
    if not items:
        raise refused("no paths in it")
    if not since_comma:
        raise refused("an empty item after the last comma; leave the comma out")
    return items


def _inside_quotes(char: str, quote: str, chars: Iterator[str], word: list[str]) -> str:
    """One character of a quoted part, added to ``word``; the quote still open after it ("" once it closed).

    Inside double quotes a backslash keeps only ``\\"`` and ``\\\\``, as a shell's does; inside single quotes
    nothing is special but the closing quote."""
    if char == quote:
        return ""
    if quote == '"' and char == "\\":
        following = next(chars, "")
        word.append(following if following in ('"', "\\") else char + following)
    else:
        word.append(char)
    return quote


def quoted_paths(paths: list[str]) -> str:
    """Paths written back as ``path_list`` reads them: comma-separated, each quoted only where it must be."""
    return ",".join(_quoted(path) for path in paths)


def _quoted(path: str) -> str:
    if path and not any(c.isspace() or c in "'\"\\," for c in path):
        return path
    return "'" + path.replace("'", "'\"'\"'") + "'"


def typed_id(text: str) -> str:
    """A job's or a sweep's id as typed, without the quotes and spaces around it."""
    return text.strip().strip("'\"")


def checked_job_id(text: str) -> str:
    """A job id as typed (quotes and spaces tolerated), checked before anything is asked of a host."""
    job_id = typed_id(text)
    problem = protocol.job_id_problem(job_id)
    if problem:
        raise UsageError(problem)
    return job_id


def out_names(text: str | None) -> list[str] | None:
    """The variable names of --out (None: what the cell assigns)."""
    if text is None:
        return None
    names = [n.strip() for n in text.strip("'\"").replace(" ", ",").split(",") if n.strip()]
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise UsageError(f"--out takes variable names separated by commas; not a name: {', '.join(map(repr, bad))}")
    return names


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def age_seconds(text: str) -> float:
    """--older-than's '30m', '12h', '7d', '90' (seconds) -> seconds."""
    text = text.strip().lower()
    unit = _UNITS.get(text[-1:], None)
    number = text[:-1] if unit else text
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also refuses nan
        raise UsageError(f"--older-than takes an age such as 30m, 12h or 7d, not {text!r}")
    return seconds


def sweep_name(text: str | None) -> str | None:
    """--as: the variable that receives the sweep object (None: as the sweep was first named)."""
    if text is not None and not text.isidentifier():
        raise UsageError(f"--as takes a variable name for the sweep object, not {text!r}")
    return text


def train_options(
    args: Any, user_ns: Mapping[str, Any]
) -> tuple[JobOptions, list[dict[str, Any]] | None, session.FileFetch | None]:
    """What %%remote_train's options ask that needs no host (the job's, a sweep's grid, --fetch), checked."""
    if args.checkpoint_every < 0:
        raise UsageError("--checkpoint-every takes a number of epochs, 0 or more (0: never checkpoint)")
    if args.no_inject and not args.detach:
        raise UsageError("--no-inject goes with --detach (a blocking cell always brings its outputs back)")
    if args.files and args.workdir:
        raise UsageError(
            "--files and --workdir do not go together: --files builds the job's own folder from this project, "
            "--workdir runs in a folder that is already on the host. Choose one"
        )
    grid = _sweep_grid(args, user_ns)
    fetch = _file_fetch(args)
    with usage_errors(RequestError):
        return JobOptions.pick(vars(args)), grid, fetch


def _sweep_grid(args: Any, user_ns: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The trials' parameters of --sweep GRID (None without it), refused before anything is sent."""
    if args.sweep is None:
        given = {"--parallel": args.parallel, "--metric": args.metric, "--mode": args.mode, "--as": args.as_name}
        for option, value in given.items():
            if value is not None:
                raise UsageError(f"{option} goes with --sweep GRID (a kernel variable holding the parameters)")
        return None
    name = typed_id(args.sweep)
    if not name.isidentifier():
        raise UsageError(f"--sweep takes the name of a kernel variable holding the grid, not {args.sweep!r}")
    if name not in user_ns:
        raise UsageError(
            f"--sweep {name}: this kernel has no variable {name}; define it in an earlier cell, "
            f"e.g. {name} = {{'lr': [0.001, 0.01], 'units': [16, 32]}}"
        )
    with usage_errors(SweepError):
        grid = expand_grid(name, user_ns[name])
    if args.parallel is not None and args.parallel < 1:
        raise UsageError(f"--parallel takes how many trials may run at once, 1 or more, not {args.parallel}")
    sweep_name(args.as_name)
    if args.fetch:
        raise UsageError(
            "--fetch does not go with --sweep: every trial writes its own files. `%remote_fetch JOB PATTERNS` "
            "brings one trial's (its job id is in sweep.results)"
        )
    return grid


def _file_fetch(args: Any) -> session.FileFetch | None:
    """What --fetch brings back when the job ends, its patterns checked before anything is sent."""
    if args.fetch_overwrite and not args.fetch:
        raise UsageError("--fetch-overwrite goes with --fetch PATTERNS")
    if not args.fetch:
        return None
    patterns = path_list(args.fetch, "--fetch")
    for pattern in patterns:
        if pattern.startswith(("/", "~")):
            raise UsageError(
                f"--fetch {pattern}: patterns are relative to the job's working folder on the host "
                "(`..` may climb within the job's own folder)"
            )
    return session.FileFetch(patterns, os.getcwd(), args.fetch_overwrite)

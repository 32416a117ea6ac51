"""``%%remote_train`` and friends: parse the options, make one session call, render what comes back.

User mistakes are ``UsageError``s, raised before anything is sent.  The job's
life is ``session``'s (``session.request`` turns the options into what a job
asks of its host), sweeps are ``sweep``'s, the panels are ``ui``'s.  Defaults
are traitlets, so they can be set in ``ipython_config.py`` or with
``%config RemoteMagics.default_host = "gpu1"``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, argument_group, magic_arguments, parse_argstring
from traitlets import Bool, Enum, Float, Int, Unicode

from . import project, session
from .agent import codec, protocol
from .config import hosts_trait, ssh_config_trait
from .project import ProjectError, envcheck, payload
from .project.capture import CaptureError
from .project.payload import PayloadError
from .registry import Registry
from .session import request
from .session.job_view import JobView, format_size
from .session.request import option_list
from .sweep import MODES, Sweep, SweepError, SweepRun, Trial, expand_grid, new_sweep_id, submit_trials
from .transport import LOCAL_HOST
from .ui.panel import make_panel
from .ui.status import JobDetail, StatusTable
from .ui.sweep_panel import make_sweep_panel
from .wire import compression, upload
from .wire.cache import DEFAULT_CACHE_LIMIT
from .wire.client import AgentClient

_T = TypeVar("_T")


@contextlib.contextmanager
def _usage_errors(*kinds: type[Exception]) -> Iterator[None]:
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

# %%remote_train's option groups: an argument_group holds the arguments below it, so these go last.
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


def _job_id(text: str) -> str:
    """A job id as typed (quotes and spaces tolerated), checked before anything is asked of a host."""
    job_id = text.strip().strip("'\"")
    problem = protocol.job_id_problem(job_id)
    if problem:
        raise UsageError(problem)
    return job_id


class MagicHints:
    """What to type to act on a job later: these magics."""

    def attach(self, job_id: str, host: str) -> str:
        return f"`%remote_attach {job_id} --host {host}` follows it and fetches its outputs"

    def detail(self, job_id: str, host: str) -> str:
        return f"its last output is in `%remote_status {job_id} --host {host}`"

    def checkpoint(self, job_id: str, host: str) -> str:
        return f"`%remote_attach {job_id} --host {host} --checkpoint` brings back the model of its last checkpoint"

    def fetch(self, job_id: str, host: str, patterns: list[str]) -> str:
        return f"the files stay on the host: `%remote_fetch {job_id} '{','.join(patterns)}' --host {host}` gets them"


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_ONE_LINE = (
    "values reach command lines and Slurm's batch script on the host, where it would start a new line "
    "(and sbatch drops the directives after it)"
)


def _control_problem(value: str) -> str | None:
    """What in ``value`` would break out of its line in a shell command or a script: its first control character."""
    found = _CONTROL.search(value)
    if found is None:
        return None
    return "a line break" if found.group() in "\r\n" else f"the control character {found.group()!r}"


def _parse(magic: Any, line: str) -> Any:
    """The magic's options, each refused before anything is sent when it would not stay on one line."""
    args = parse_argstring(magic, line)
    options = {action.dest: (action.option_strings or [action.dest])[0] for action in magic.parser._actions}
    for dest, value in vars(args).items():
        problem = _control_problem(value) if isinstance(value, str) else None
        if problem:
            shown = value.strip("'\"")  # as typed, without the quotes around it
            raise UsageError(
                f"{options.get(dest, dest)} {shown!r} has {problem} in it: {_ONE_LINE}. Give it on one line, "
                "without control characters; nothing was sent"
            )
    return args


def _check_host_settings(host: str, settings: dict[str, Any]) -> None:
    """The host's name and every string of its settings (python, root, partition, setup lines...) on one line."""
    problem = _control_problem(host)
    if problem:
        raise UsageError(f"the host name {host!r} has {problem} in it: {_ONE_LINE}. Give it on one line")
    for key, value in settings.items():
        for item in value if isinstance(value, list | tuple) else [value]:
            problem = _control_problem(item) if isinstance(item, str) else None
            if problem:
                raise UsageError(
                    f"c.RemoteMagics.hosts[{host!r}][{key!r}] {item!r} has {problem} in it: {_ONE_LINE}. Give each "
                    "value on one line (several setup lines go as a list of strings); nothing was sent"
                )


def _file_fetch(args: Any) -> session.FileFetch | None:
    """What --fetch brings back when the job ends, its patterns checked before anything is sent."""
    if args.fetch_overwrite and not args.fetch:
        raise UsageError("--fetch-overwrite goes with --fetch PATTERNS")
    if not args.fetch:
        return None
    patterns = option_list(args.fetch)
    for pattern in patterns:
        if pattern.startswith(("/", "~")):
            raise UsageError(
                f"--fetch {pattern}: patterns are relative to the job's working folder on the host "
                "(`..` may climb within the job's own folder)"
            )
    return session.FileFetch(patterns, os.getcwd(), args.fetch_overwrite)


class _PanelWhenNeeded:
    """The job's panel, shown only once there is something to show (a build, an upload, the job itself)."""

    def __init__(self, make: Any) -> None:
        self._make = make
        self._panel: Any = None

    def get(self) -> Any:
        if self._panel is None:
            self._panel = self._make()
        return self._panel


def _upload_progress(panel: _PanelWhenNeeded) -> upload.Progress:
    return session.shown_progress(lambda text: panel.get().progress(text), "uploading")


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.strip("'\"").replace(" ", ",").split(",") if n.strip()]
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise UsageError(f"--out takes variable names separated by commas; not a name: {', '.join(map(repr, bad))}")
    return names


@magics_class
class RemoteMagics(Magics):
    """Run a cell on a GPU host over SSH and get its results back."""

    default_host = Unicode(
        os.environ.get("REMOTE_MAGIC_DEFAULT_HOST", LOCAL_HOST),
        help="Host used when --host is not given ($REMOTE_MAGIC_DEFAULT_HOST, else 'local').",
    ).tag(config=True)
    hosts = hosts_trait()
    ssh_config = ssh_config_trait()
    panel = Enum(
        ("auto", "widget", "text"),
        os.environ.get("REMOTE_MAGIC_PANEL", "auto"),
        help="How a job is shown: 'auto' is widgets in a Jupyter kernel, text elsewhere; "
        "'text' suits headless runs ($REMOTE_MAGIC_PANEL).",
    ).tag(config=True)
    reconnect_timeout = Float(
        session.RECONNECT_TIMEOUT, help="Seconds to keep trying to reconnect after the link drops."
    ).tag(config=True)

    compress = Enum(compression.MODES, "auto", help="Default of --compress: zstd for uploads only where it pays.").tag(
        config=True
    )
    warm_runner = Bool(
        True,
        help="Keep a pre-started runner on each host with the heavy packages (TensorFlow, PyTorch, ...) "
        "the last jobs imported, so the next job starts without the import cost.",
    ).tag(config=True)
    prewarm = Bool(
        True,
        help="When the extension loads, connect to the default host in the background and start its warm "
        "runner, so the first cell does not wait for the connection, the agent and the imports.",
    ).tag(config=True)
    follow_detached = Bool(
        False,
        help="Follow --detach jobs in the background outside Jupyter kernels too (terminal IPython).",
    ).tag(config=True)
    ship_modules = Enum(
        ("auto", "none"),
        "auto",
        help="'auto': the local modules a cell needs (files next to the notebook, your editable installs) travel "
        "with it; 'none': only what --modules names.",
    ).tag(config=True)
    cache_limit = Int(
        DEFAULT_CACHE_LIMIT,
        help="Bytes of downloaded outputs kept in the local cache (least recently used go first; 0: no cache).",
    ).tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell, **kwargs)
        self.environment_checks = request.EnvironmentChecks()
        self._slow_path_noted: set[str] = set()  # hosts whose failed bulk path the user was told about
        self.connections = session.Connections()
        self.registry = Registry()
        self.lifecycle = session.JobLifecycle(lambda values: self.shell.user_ns.update(values), MagicHints())
        self._helpers: list[threading.Thread] = []  # prewarm and cells' connects: waited for when unloading
        self._in_background(envcheck.installed_modules)  # what the first cell's environment check reads
        if self.prewarm and self.warm_runner:
            self._in_background(self._prewarm)

    def _prewarm(self) -> None:
        """Connect, check the agent and start the default host's warm runner while the user's first cells run.

        Quiet: a host that cannot be reached now says so when a cell asks for it, as without this.
        """
        try:
            host = self.default_host
            client = self._client(host)
            hello = _connected(client)
            if request.host_launcher(self.connections.settings_for(host), hello) == request.SLURM:
                return  # no warm runners on a login node
            client.warm_up(session.expected_kernel_backend())
        except Exception:  # noqa: BLE001  (a warm-up that fails only costs the speed it would have won)
            pass

    @property
    def background(self) -> list[session.BackgroundFollower]:
        return self.lifecycle.background

    # ------------------------------------------------------------- helpers
    def _client(self, host: str | None, python: str | None = None) -> AgentClient:
        self.connections.hosts, self.connections.ssh_config = self.hosts, self.ssh_config  # %config may change them
        self.lifecycle.reconnect_timeout, self.lifecycle.cache_limit = self.reconnect_timeout, self.cache_limit
        _check_host_settings(host or self.default_host, dict(self.hosts.get(host or self.default_host) or {}))
        try:
            return self.connections.get(host or self.default_host, python)
        except ValueError as exc:
            raise UsageError(f"c.RemoteMagics.hosts: {exc}") from None

    def _kernel_stays_alive(self) -> bool:
        """Background following makes sense in a Jupyter kernel, not in a one-shot script."""
        return getattr(self.shell, "kernel", None) is not None or self.follow_detached

    def _job_host(self, job_id: str, host: str | None) -> str | None:
        """The host a job runs on: as given, else as recorded when it was submitted here."""
        if host:
            return host
        record = self.registry.find(job_id)
        return record.host if record else None

    def _notebook_path(self) -> str | None:
        return self.shell.user_ns.get("__session__") or os.environ.get("JPY_SESSION_NAME")

    def stop_background(self, timeout: float = 5.0) -> None:
        """Stop following detached jobs (they run on) and let connects still under way finish, so that none
        logs in after the connections close; used when the extension unloads."""
        for helper in self._helpers:
            helper.join(timeout)
        self._helpers.clear()
        self.lifecycle.stop_background(timeout)

    def _in_background(self, work: Callable[[], _T]) -> concurrent.futures.Future[_T]:
        """``work()`` in a thread of its own; its result, or its error, is raised where the cell waits for it.

        A cell that fails before it waits (an undefined name) leaves the connect running: the next cell
        finds the host ready.
        """
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(work())
            except BaseException as exc:  # noqa: BLE001  (handed to the cell's thread, which raises it)
                future.set_exception(exc)

        helper = threading.Thread(target=run, name="remote_magic cell", daemon=True)
        self._helpers = [thread for thread in self._helpers if thread.is_alive()] + [helper]
        helper.start()
        return future

    # -------------------------------------------------------------- magics
    @magic_arguments()
    @host_argument
    @argument("--python", help="the Python interpreter on the host (default: python3; 'local' uses this kernel's)")
    @argument("--out", help="comma-separated names to bring back (default: what the cell assigns or trains)")
    @argument("--name", help="a name for the job, shown by %%remote_status")
    @argument(
        "--detach",
        action="store_true",
        help="return at once; the job runs on, its panel updates while the kernel is idle, "
        "and its outputs are injected when it ends",
    )
    @argument("--no-inject", action="store_true", help="do not inject the outputs of a detached job when it ends")
    @argument(
        "--checkpoint-every",
        type=int,
        default=1,
        metavar="N",
        help="save the model being trained every N epochs on the host (0: never); a killed job still yields it",
    )
    @argument("--backend", choices=session.KERAS_BACKENDS, help="the job's Keras backend (default: this kernel's)")
    @argument(
        "--compress",
        choices=compression.MODES,
        help="compress uploads with zstd: 'auto' (default: only on a slow link with compressible data), 'zstd', 'none'",
    )
    @project_options
    @gpu_options
    @sweep_options
    @slurm_options
    @cell_magic
    def remote_train(self, line: str, cell: str) -> None:
        """Run this cell on a host and bring back what it assigned.

        The variables the cell reads are sent, with the local modules it
        imports and the files of --files; each Keras epoch is shown live; when
        the cell ends, the variables it assigns (and inputs it trains or
        changes in place, such as a model whose fit ran) appear here.
        """
        args = _parse(self.remote_train, line)
        options, grid, fetch = self._train_options(args)
        client = self._client(args.host, args.python)
        # Connect (and bring up the bulk path) while the inputs are pickled and hashed: on a fresh kernel the
        # connection is ready when they are.
        connecting = self._in_background(lambda: _connected(client))
        hashes = project.HashCache()  # a sweep's trials share their files: each is hashed once
        submissions = [self._prepare(cell, args, params, hashes) for params in ([{}] if grid is None else grid)]
        # Hash the inputs' buffers while the environment is checked (both need seconds for GiBs or a new set
        # of imports; hashlib lets go of the GIL).
        seen: dict[tuple[int, int], str] = {}  # a sweep's trials share their arrays: each is hashed once
        hashing = self._in_background(lambda: [submission.payload.hash(seen) for submission in submissions])
        settings = self.connections.settings_for(args.host or self.default_host)
        host = request.HostFacts.from_hello(client.host, settings, connecting.result())
        with _usage_errors(request.RequestError):
            job = request.job_request(options, host, None if grid is None else len(grid))
        sweep = None if grid is None else self._new_sweep(client.host, grid, job.parallel, args)
        panel = self._panel_for(client.host, sweep)
        for submission in submissions:
            job.apply(submission)
        for note in (*job.notes, *codec.take_notes()):  # codec's: e.g. a dataset saved with one shuffle order
            panel.get().note(note)
        self._check_environments(client, args.env, submissions, panel)
        hashing.result()
        if sweep is None:
            self._submit_job(client, submissions[0], args, fetch, panel)
        else:
            self._submit_sweep(client, sweep, submissions, args, panel)

    def _train_options(
        self, args: Any
    ) -> tuple[request.JobOptions, list[dict[str, Any]] | None, session.FileFetch | None]:
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
        grid = self._sweep_grid(args)
        fetch = _file_fetch(args)
        with _usage_errors(request.RequestError):
            return request.JobOptions.pick(vars(args)), grid, fetch

    def _prepare(self, cell: str, args: Any, params: dict[str, Any], hashes: project.HashCache) -> session.Submission:
        """The cell as one job; a sweep's trial sees its parameters as variables (sent, whether or not defined here)."""
        shell = self.shell
        with _usage_errors(CaptureError, PayloadError, ProjectError):
            submission = session.prepare(
                cell,
                {**shell.user_ns, **params} if params else shell.user_ns,
                set(shell.user_ns_hidden) - set(params),
                outputs=_names(args.out),
                name=args.name,
                files=args.files,
                ship_modules=self.ship_modules == "auto",
                extra_modules=option_list(args.modules) if args.modules else None,
                hashes=hashes,
                hash_buffers=False,  # hashed beside the connection and the environment check
            )
        submission.checkpoint_every = args.checkpoint_every
        submission.warm = self.warm_runner
        submission.compress = args.compress or self.compress
        submission.workdir = args.workdir
        submission.backend = args.backend or session.kernel_backend()
        return submission

    def _sweep_grid(self, args: Any) -> list[dict[str, Any]] | None:
        """The trials' parameters of --sweep GRID (None without it), refused before anything is sent."""
        if args.sweep is None:
            given = {"--parallel": args.parallel, "--metric": args.metric, "--mode": args.mode, "--as": args.as_name}
            for option, value in given.items():
                if value is not None:
                    raise UsageError(f"{option} goes with --sweep GRID (a kernel variable holding the parameters)")
            return None
        name = args.sweep.strip().strip("'\"")
        if not name.isidentifier():
            raise UsageError(f"--sweep takes the name of a kernel variable holding the grid, not {args.sweep!r}")
        if name not in self.shell.user_ns:
            raise UsageError(
                f"--sweep {name}: this kernel has no variable {name}; define it in an earlier cell, "
                f"e.g. {name} = {{'lr': [0.001, 0.01], 'units': [16, 32]}}"
            )
        with _usage_errors(SweepError):
            grid = expand_grid(name, self.shell.user_ns[name])
        if args.parallel is not None and args.parallel < 1:
            raise UsageError(f"--parallel takes how many trials may run at once, 1 or more, not {args.parallel}")
        if args.as_name is not None and not args.as_name.isidentifier():
            raise UsageError(f"--as takes a variable name for the sweep object, not {args.as_name!r}")
        if args.fetch:
            raise UsageError(
                "--fetch does not go with --sweep: every trial writes its own files. `%remote_fetch JOB PATTERNS` "
                "brings one trial's (its job id is in sweep.results)"
            )
        return grid

    def _new_sweep(self, host: str, grid: list[dict[str, Any]], parallel: int | None, args: Any) -> Sweep:
        trials = [Trial(number, params) for number, params in enumerate(grid)]
        return Sweep(new_sweep_id(), host, trials, args.metric, args.mode, parallel, args.as_name)

    def _panel_for(self, host: str, sweep: Sweep | None) -> _PanelWhenNeeded:
        if sweep is None:
            return _PanelWhenNeeded(lambda: make_panel(host, self.panel))
        return _PanelWhenNeeded(lambda: make_sweep_panel(sweep, self.panel))

    def _check_environments(
        self, client: AgentClient, env: str | None, submissions: list[session.Submission], panel: _PanelWhenNeeded
    ) -> None:
        """Build the --env environment (once for every trial), then refuse what could not load there, before upload."""
        if env:
            key = self._environment(client, env, submissions[0], panel) or None
            for submission in submissions:
                submission.env = key
        for submission in submissions:  # checked once per set of imports: the trials' are the same
            for note in self.environment_checks.check(client, submission):
                panel.get().note(note)

    def _submit_job(
        self,
        client: AgentClient,
        submission: session.Submission,
        args: Any,
        fetch: session.FileFetch | None,
        panel: _PanelWhenNeeded,
    ) -> None:
        """Submit the job and record it; follow it here, or with --detach in the background (in a kernel)."""
        with _usage_errors(upload.FileChanged):
            job_id = session.submit(client, submission, progress=_upload_progress(panel))
        self._note_slow_path(client, panel)
        self.registry.add(client.host, job_id, args.name, self._notebook_path())
        if fetch is not None:  # where this folder lies in the job's layout: files land in it, never above
            fetch.layout_cwd = submission.cwd
        if args.detach:
            print(
                f"job {job_id} submitted to host {client.host}; it runs on. "
                f"`%remote_status --host {client.host}` lists it, "
                f"`%remote_attach {job_id} --host {client.host}` follows it and brings its outputs back."
            )
            if not self._kernel_stays_alive():
                return
        shown = panel.get()
        shown.start(job_id, args.name)
        if args.detach:
            self.lifecycle.follow_in_background(client, job_id, shown, not args.no_inject, fetch=fetch)
        else:
            self.lifecycle.run(client, job_id, shown, fetch=fetch)

    def _submit_sweep(
        self,
        client: AgentClient,
        sweep: Sweep,
        submissions: list[session.Submission],
        args: Any,
        panel: _PanelWhenNeeded,
    ) -> None:
        """Submit every trial (the host keeps to --parallel), then follow them all into one panel."""
        with _usage_errors(upload.FileChanged):
            submit_trials(
                client, sweep, submissions, self.registry, args.name, self._notebook_path(), _upload_progress(panel)
            )
        run = SweepRun(client, sweep, panel.get(), self.lifecycle, inject=not args.no_inject)
        if args.detach:
            print(
                f"sweep {sweep.id}: {len(sweep.trials)} trials submitted to host {client.host}, {sweep.parallel} at a "
                f"time; they run on. `%remote_status --host {client.host}` lists them, "
                f"`%remote_attach {sweep.id}` follows the sweep and brings back `{sweep.name or 'sweep'}`."
            )
            if self._kernel_stays_alive():
                panel.get().start()
                run.start(detached=True)
            return
        panel.get().start()
        run.start()
        run.wait()

    def _environment(self, client: AgentClient, env: str, submission: session.Submission, panel: Any) -> str:
        """Build the --env environment on the host (once), showing its build; its key ("" when nothing is needed)."""
        with _usage_errors(ProjectError):
            key, built = session.ensure_environment(
                client, env, submission, lambda text: panel.get().progress(f"environment: {text}")
            )
        if built.get("empty"):
            panel.get().note("--env auto: the host has every package the job needs; no environment was built")
        elif built["built"]:
            panel.get().note(f"built environment {key} on host {client.host} in {built['seconds']:.1f} s")
        return key

    def _note_slow_path(self, client: AgentClient, panel: _PanelWhenNeeded) -> None:
        """Say once per host when `ssh` exists but could not carry the large blobs (they went the slower way)."""
        if client.bulk_failure is None or client.host in self._slow_path_noted:
            return
        self._slow_path_noted.add(client.host)
        panel.get().note(
            f"large inputs and outputs go through paramiko, more slowly: `ssh` could not log in to {client.host} "
            f"by itself ({client.bulk_failure}). Check that `ssh {client.host} true` works without a prompt, or "
            f"set c.RemoteMagics.hosts = {{{client.host!r}: {{'bulk_ssh': None}}}} to use paramiko alone"
        )

    @magic_arguments()
    @host_argument
    @argument("job", nargs="?", help="a job id: show its detail and last log lines; a sweep id (sweep-...): its trials")
    @line_magic
    def remote_status(self, line: str) -> StatusTable | JobDetail:
        """List jobs (state, epoch, last loss, timing), or one job in detail.

        Without --host: every job this machine submitted, on every host.
        """
        args = _parse(self.remote_status, line)
        if args.job and protocol.is_sweep_id(args.job.strip().strip("'\"")):
            client, found, _ = self._sweep_trials(args.job.strip().strip("'\""), args.host, "remote_status")
            ids = {job_id for _, _, job_id, _ in found}
            return StatusTable(client.host, [row for row in client.status() if row["job_id"] in ids])
        if args.job:
            job_id = _job_id(args.job)
            client = self._client(self._job_host(job_id, args.host))
            return JobDetail(client.host, client.status(job_id))
        if args.host:
            client = self._client(args.host)
            return StatusTable(client.host, client.status(), client.gpus())
        return StatusTable(None, session.registered_jobs(self.registry.records(), self._client))

    @magic_arguments()
    @host_argument
    @argument("job", help="the job id, as shown by %%remote_status, or a sweep's id (sweep-...)")
    @argument(
        "--checkpoint",
        action="store_true",
        help="inject the model from the job's last checkpoint (for a job that was killed or is still running)",
    )
    @argument("--as", dest="as_name", metavar="NAME", help="for a sweep: the name of the sweep object injected")
    @line_magic
    def remote_attach(self, line: str) -> None:
        """Replay a job's events, follow it live, and inject its outputs when it ends.

        For a sweep: follow every trial into one panel, then inject the sweep object.
        """
        args = _parse(self.remote_attach, line)
        sweep_id = args.job.strip().strip("'\"")
        if protocol.is_sweep_id(sweep_id):
            self._attach_sweep(sweep_id, args)
            return
        if args.as_name is not None:
            raise UsageError("--as names the object of a sweep: give a sweep's id (sweep-...)")
        job_id = _job_id(args.job)
        client = self._client(self._job_host(job_id, args.host))
        if args.checkpoint:
            values, meta = session.fetch_checkpoint(client, job_id)
            self.shell.user_ns.update(values)
            print(
                f"injected {', '.join(values)} from the checkpoint of job {job_id} on host {client.host} "
                f"at epoch {meta['epoch']} of {meta.get('epochs') or '?'}"
            )
            return
        panel = make_panel(client.host, self.panel)
        panel.start(job_id)
        self.lifecycle.run(client, job_id, panel)

    def _attach_sweep(self, sweep_id: str, args: Any) -> None:
        """Rebuild a sweep from the registry (a kernel restart lost it), follow its trials, inject the sweep object."""
        if args.checkpoint:
            raise UsageError(
                "--checkpoint brings back one job's model: give a trial's job id (they are in sweep.results)"
            )
        if args.as_name is not None and not args.as_name.isidentifier():
            raise UsageError(f"--as takes a variable name for the sweep object, not {args.as_name!r}")
        client, found, meta = self._sweep_trials(sweep_id, args.host, "remote_attach")
        trials = [
            Trial(number, dict(params or {}), job_id, JobView(client.host, job_id, name))
            for number, params, job_id, name in sorted(found, key=lambda trial: trial[0])
        ]
        sweep = Sweep(
            sweep_id, client.host, trials, meta.get("metric"), meta.get("mode"), meta.get("parallel"),
            args.as_name or meta.get("name"),
        )  # fmt: skip
        panel = make_sweep_panel(sweep, self.panel)
        panel.start()
        run = SweepRun(client, sweep, panel, self.lifecycle)
        run.start()
        run.wait()

    def _sweep_trials(
        self, sweep_id: str, host: str | None, magic: str
    ) -> tuple[AgentClient, list[tuple[int, Any, str, str | None]], dict[str, Any]]:
        """A sweep's host and trials, as (number, parameters as recorded, job id, name), and what it was run with.

        From the registry when this machine submitted it, else (with --host)
        from the host's status rows.
        """
        records = self.registry.sweep(sweep_id)
        if not records and not host:
            raise UsageError(
                f"sweep {sweep_id} was not submitted from this machine (it is not in {self.registry.path}); "
                f"`%{magic} {sweep_id} --host HOST` finds its trials on the host"
            )
        client = self._client(host or records[0].host)
        found = [(r.sweep["trial"], r.sweep.get("params"), r.job_id, r.name) for r in records if r.sweep]
        meta = (records[0].sweep or {}) if records else {}
        if not found:  # submitted elsewhere: the host's status rows say which jobs are its trials
            rows = [row for row in client.status() if (row.get("sweep") or {}).get("id") == sweep_id]
            found = [(r["sweep"]["trial"], r["sweep"].get("params"), r["job_id"], r.get("name")) for r in rows]
            meta = rows[0]["sweep"] if rows else {}
        if not found:
            raise UsageError(f"host {client.host} has no trial of sweep {sweep_id} (collected by %remote_gc?)")
        return client, sorted(found, key=lambda trial: trial[0]), meta

    @magic_arguments()
    @host_argument
    @job_argument
    @argument("patterns", help="comma-separated globs of the job's files, relative to its working folder")
    @argument("--overwrite", action="store_true", help="replace local files that have other content")
    @line_magic
    def remote_fetch(self, line: str) -> None:
        """Bring files a job wrote on the host into this working folder (same relative paths)."""
        args = _parse(self.remote_fetch, line)
        job_id = _job_id(args.job)
        client = self._client(self._job_host(job_id, args.host))
        wanted = session.FileFetch(option_list(args.patterns), os.getcwd(), args.overwrite)
        for note in session.fetch_files(client, job_id, wanted, self.lifecycle.cache()):
            print(note)

    @magic_arguments()
    @host_argument
    @argument("--env", metavar="FILE|auto", help="compare with this environment on the host (built if needed)")
    @line_magic
    def remote_env(self, line: str) -> Any:
        """This kernel's Python and packages next to the host's: what would refuse a job, what only differs.

        Compares the packages of the last cell sent to the host, and
        cloudpickle, numpy, Keras and its backend, PyTorch and JAX where this
        kernel has them.
        """
        args = _parse(self.remote_env, line)
        client = self._client(args.host)
        client.hello()
        base = [name for name in session.BASE_PACKAGES if session.has_distribution(name)]
        needed = list(dict.fromkeys([*base, *self.environment_checks.last_imports.get(client.host, [])]))
        env = None
        if args.env:
            empty = session.Submission("", [], [], payload.pack({}, {}), imports=needed)
            env = self._environment(client, args.env, empty, _PanelWhenNeeded(lambda: make_panel(client.host, "text")))
        return session.environment_report(client, needed, env or None)

    @magic_arguments()
    @host_argument
    @job_argument
    @line_magic
    def remote_cancel(self, line: str) -> None:
        """Stop a job now: its whole process group is ended (SIGTERM, then SIGKILL)."""
        args = _parse(self.remote_cancel, line)
        if protocol.is_sweep_id(args.job.strip().strip("'\"")):
            sweep_id = args.job.strip().strip("'\"")
            client, found, _ = self._sweep_trials(sweep_id, args.host, "remote_cancel")
            ended = sum(1 for _, _, job_id, _ in found if client.cancel(job_id).get("cancelled"))
            print(
                f"sweep {sweep_id} on host {client.host}: cancelled {ended} of its {len(found)} trials "
                f"(the others had ended)"
            )
            return
        job_id = _job_id(args.job)
        client = self._client(self._job_host(job_id, args.host))
        result = client.cancel(job_id)
        if result.get("cancelled"):
            print(f"job {job_id} on host {client.host} cancelled")
        else:
            print(f"job {job_id} on host {client.host} was not running (state: {result.get('state')})")
        if result.get("remaining"):
            print(f"{result['remaining']} of its processes could not be ended (stuck in the kernel?); check the host")

    @magic_arguments()
    @host_argument
    @argument(
        "--older-than",
        default="7d",
        help="age of finished jobs to remove, and of environments no job used since: 30m, 12h, 7d, 0 (default 7d)",
    )
    @argument(
        "--include-unfetched", action="store_true", help="also remove finished jobs whose outputs were never fetched"
    )
    @argument("--dry-run", action="store_true", help="only say what would be removed")
    @line_magic
    def remote_gc(self, line: str) -> None:
        """Remove finished jobs, the blobs no job references and the environments no job used lately, on one host.

        Running jobs are never touched, nor the environments they or a warm
        runner use; finished jobs whose outputs were not fetched are kept
        unless --include-unfetched.
        """
        args = _parse(self.remote_gc, line)
        older_than = _seconds(args.older_than)
        client = self._client(args.host)
        result = client.gc(older_than, args.include_unfetched, args.dry_run)
        if not args.dry_run:
            self.registry.remove(client.host, set(result["removed_jobs"]))
        verb = "would remove" if args.dry_run else "removed"
        agents = len(result.get("removed_agents", []))
        unused_envs = result.get("removed_envs", [])
        print(
            f"host {client.host}: {verb} {len(result['removed_jobs'])} jobs, {result['removed_blobs']} blobs, "
            f"{agents} old agent versions and {len(unused_envs)} environments no job used within {args.older_than} "
            f"({format_size(result['freed_bytes'])})"
        )
        if unused_envs:
            print(f"{verb} environments {', '.join(unused_envs)} (a later --env builds its environment again)")
        if result["kept_unfetched"]:
            print(
                f"kept {len(result['kept_unfetched'])} finished jobs whose outputs were never fetched "
                f"({', '.join(result['kept_unfetched'])}); `%remote_attach JOB` fetches them, --include-unfetched removes them"
            )


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _seconds(text: str) -> float:
    """'30m', '12h', '7d', '90' (seconds) -> seconds."""
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


def _connected(client: AgentClient) -> dict[str, Any]:
    """The host's hello, once connected; then the bulk path comes up in the background."""
    hello = client.hello()
    client.start_bulk()
    return hello

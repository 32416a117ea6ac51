"""``%%remote_train`` and friends: argument parsing and user errors only.

Everything else is delegated: ``session`` runs the job's life, ``ui`` shows
it.  Defaults are traitlets, so they can be set in ``ipython_config.py`` or
with ``%config RemoteMagics.default_host = "gpu1"``.
"""

from __future__ import annotations

import os
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Bool, Enum, Float, Int, Unicode

from . import compression, payload, session, upload
from .agent import codec, protocol
from .cache import DEFAULT_CACHE_LIMIT
from .capture import CaptureError
from .client import AgentClient
from .config import hosts_trait, ssh_config_trait
from .errors import HostSetupError
from .payload import PayloadError
from .project import ProjectError
from .registry import Registry
from .transport import LOCAL_HOST
from .ui.panel import make_panel
from .ui.status import JobDetail, StatusTable


def host_argument(func: Any) -> Any:
    return argument(
        "--host",
        help="an alias from ~/.ssh/config, or user@host[:port]; default: RemoteMagics.default_host "
        "('local' runs the job in a subprocess on this machine)",
    )(func)


def job_argument(func: Any) -> Any:
    return argument("job", help="the job id, as shown by %%remote_status")(func)


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


def _list(text: str) -> list[str]:
    """A comma-separated option value, quotes and spaces around items tolerated."""
    return [item.strip() for item in text.strip().strip("'\"").split(",") if item.strip()]


def _gpu_request(
    count: str | None, ids: str | None, host_gpus: list[dict[str, Any]], host: str
) -> tuple[int | str, list[int] | None, bool]:
    """(gpus, gpu_ids, whether the default was used), checked against the host's GPUs before anything is sent."""
    have = len(host_gpus)
    none_there = f"host {host} has no GPUs (nvidia-smi finds none there)"
    if ids is not None:
        try:
            wanted = [int(i) for i in _list(ids)]
        except ValueError:
            raise UsageError(f"--gpu-ids takes GPU numbers such as 2,3, not {ids!r}") from None
        if not have:
            raise UsageError(f"--gpu-ids {ids}: {none_there}; leave it out to run on the CPU")
        missing = [i for i in wanted if not 0 <= i < have]
        if missing or not wanted or len(set(wanted)) != len(wanted):
            raise UsageError(f"--gpu-ids {ids}: host {host} has GPUs 0 to {have - 1}, each once")
        return 0, sorted(wanted), False
    if count is None:
        return (1 if have else 0), None, bool(have)
    text = count.strip().strip("'\"").lower()
    if text == "all":
        if not have:
            raise UsageError(f"--gpus all: {none_there}; leave it out to run on the CPU")
        return "all", None, False
    if not text.isdigit():
        raise UsageError(f"--gpus takes a number of GPUs (0 for none) or 'all', not {count!r}")
    number = int(text)
    if number > have:
        raise UsageError(
            f"--gpus {number}: {none_there}" if not have else f"--gpus {number}: host {host} has {have} GPUs"
        )
    return number, None, False


class _PanelWhenNeeded:
    """The job's panel, shown only once there is something to show (a build, an upload, the job itself)."""

    def __init__(self, make: Any) -> None:
        self._make = make
        self._panel: Any = None

    def get(self) -> Any:
        if self._panel is None:
            self._panel = self._make()
        return self._panel


def _upload_progress(panel: _PanelWhenNeeded) -> Any:
    def progress(sent: int, total: int) -> None:
        if total >= SHOWN_UPLOAD_BYTES:
            panel.get().progress(f"uploading: {sent / 1e6:,.1f} of {total / 1e6:,.1f} MB ({100 * sent // total}%)")

    return progress


# Uploads at least this big show their progress in the panel.
SHOWN_UPLOAD_BYTES = 32 * 1024 * 1024


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
        self._checked_environments: dict[tuple[Any, ...], Any] = {}
        self._last_imports: dict[str, list[str]] = {}
        self.connections = session.Connections()
        self.registry = Registry()
        self.lifecycle = session.JobLifecycle(lambda values: self.shell.user_ns.update(values), MagicHints())

    @property
    def background(self) -> list[session.BackgroundFollower]:
        return self.lifecycle.background

    # ------------------------------------------------------------- helpers
    def _client(self, host: str | None, python: str | None = None) -> AgentClient:
        self.connections.hosts, self.connections.ssh_config = self.hosts, self.ssh_config  # %config may change them
        self.lifecycle.reconnect_timeout, self.lifecycle.cache_limit = self.reconnect_timeout, self.cache_limit
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
        """Stop following detached jobs (they run on); used when the extension unloads."""
        self.lifecycle.stop_background(timeout)

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
    @argument(
        "--compress",
        choices=compression.MODES,
        help="compress uploads with zstd: 'auto' (default: only on a slow link with compressible data), 'zstd', 'none'",
    )
    @argument("--no-inject", action="store_true", help="do not inject the outputs of a detached job when it ends")
    @argument(
        "--checkpoint-every",
        type=int,
        default=1,
        metavar="N",
        help="save the model being trained every N epochs on the host (0: never); a killed job still yields it",
    )
    @argument(
        "--files",
        metavar="PATHS",
        help="comma-separated files, folders and globs (relative to the working folder, .. allowed) that travel "
        "with the job and appear on the host in the same layout, so relative paths in the cell work unchanged",
    )
    @argument(
        "--workdir", metavar="PATH", help="run the cell in this folder on the host (data that already lives there)"
    )
    @argument(
        "--fetch",
        metavar="PATTERNS",
        help="comma-separated globs of files the cell writes (model.keras, logs/**) to bring back into this "
        "working folder when the job ends",
    )
    @argument("--fetch-overwrite", action="store_true", help="let --fetch replace local files with other content")
    @argument(
        "--modules",
        metavar="NAMES",
        help="comma-separated local modules to send that the automatic detection cannot see",
    )
    @argument(
        "--env",
        metavar="FILE|auto",
        help="run in a host environment built (once, then cached) from a requirements file, or from this "
        "kernel's versions of the packages the host lacks ('auto')",
    )
    @argument("--backend", choices=session.KERAS_BACKENDS, help="the job's Keras backend (default: this kernel's)")
    @argument(
        "--gpus",
        metavar="N|all",
        help="how many of the host's GPUs the job holds, alone (default: 1 on a host with GPUs, 0 without); "
        "the job waits in the host's queue until they are free",
    )
    @argument("--gpu-ids", metavar="IDS", help="exactly these GPUs of the host, e.g. 2,3")
    @cell_magic
    def remote_train(self, line: str, cell: str) -> None:
        """Run this cell on a host and bring back what it assigned.

        The variables the cell reads are sent, with the local modules it
        imports and the files of --files; each Keras epoch is shown live; when
        the cell ends, the variables it assigns (and inputs it trains or
        changes in place, such as a model whose fit ran) appear here.
        """
        args = parse_argstring(self.remote_train, line)
        if args.checkpoint_every < 0:
            raise UsageError("--checkpoint-every takes a number of epochs, 0 or more (0: never checkpoint)")
        if args.no_inject and not args.detach:
            raise UsageError("--no-inject goes with --detach (a blocking cell always brings its outputs back)")
        if args.files and args.workdir:
            raise UsageError(
                "--files and --workdir do not go together: --files builds the job's own folder from this project, "
                "--workdir runs in a folder that is already on the host. Choose one"
            )
        if args.fetch_overwrite and not args.fetch:
            raise UsageError("--fetch-overwrite goes with --fetch PATTERNS")
        fetch = None
        if args.fetch:
            patterns = _list(args.fetch)
            for pattern in patterns:
                if pattern.startswith(("/", "~")):
                    raise UsageError(
                        f"--fetch {pattern}: patterns are relative to the job's working folder on the host "
                        "(`..` may climb within the job's own folder)"
                    )
            fetch = session.FileFetch(patterns, os.getcwd(), args.fetch_overwrite)
        shell = self.shell
        try:
            submission = session.prepare(
                cell,
                shell.user_ns,
                set(shell.user_ns_hidden),
                outputs=_names(args.out),
                name=args.name,
                files=args.files,
                ship_modules=self.ship_modules == "auto",
                extra_modules=_list(args.modules) if args.modules else None,
            )
        except (CaptureError, PayloadError, ProjectError) as exc:
            raise UsageError(str(exc)) from None
        submission.checkpoint_every = args.checkpoint_every
        submission.warm = self.warm_runner
        submission.compress = args.compress or self.compress
        submission.workdir = args.workdir
        submission.backend = args.backend or session.kernel_backend()
        if args.gpus is not None and args.gpu_ids is not None:
            raise UsageError("--gpus and --gpu-ids do not go together: give a count, or the GPUs themselves")
        client = self._client(args.host, args.python)
        hello = client.hello()
        panel = _PanelWhenNeeded(lambda: make_panel(client.host, self.panel))
        host_gpus = hello.get("gpus") or []
        submission.gpus, submission.gpu_ids, default_used = _gpu_request(
            args.gpus, args.gpu_ids, host_gpus, client.host
        )
        if host_gpus:
            settings = self.connections.settings_for(args.host or self.default_host)
            submission.busy_gpu_memory = settings.busy_gpu_memory
        if default_used and len(host_gpus) > 1:
            panel.get().note(f"using 1 of {len(host_gpus)} GPUs; --gpus all for all")
        for note in codec.take_notes():  # e.g. a dataset saved with one shuffle order
            panel.get().note(note)
        if args.env:
            submission.env = self._environment(client, args.env, submission, panel) or None
        self._check_environment(client, submission, panel)
        try:
            job_id = session.submit(client, submission, progress=_upload_progress(panel))
        except upload.FileChanged as exc:
            raise UsageError(str(exc)) from None
        self.registry.add(client.host, job_id, args.name, self._notebook_path())
        if args.detach:
            print(
                f"job {job_id} submitted to host {client.host}; it runs on. "
                f"`%remote_status --host {client.host}` lists it, "
                f"`%remote_attach {job_id} --host {client.host}` follows it and brings its outputs back."
            )
            if self._kernel_stays_alive():
                shown = panel.get()
                shown.start(job_id, args.name)
                self.lifecycle.follow_in_background(client, job_id, shown, not args.no_inject, fetch=fetch)
            return
        shown = panel.get()
        shown.start(job_id, args.name)
        self.lifecycle.run(client, job_id, shown, fetch=fetch)

    def _environment(self, client: AgentClient, env: str, submission: session.Submission, panel: Any) -> str:
        """Build the --env environment on the host (once), showing its build; its key ("" when nothing is needed)."""
        try:
            key, built = session.ensure_environment(
                client, env, submission, lambda text: panel.get().progress(f"environment: {text}")
            )
        except ProjectError as exc:
            raise UsageError(str(exc)) from None
        if built.get("empty"):
            panel.get().note("--env auto: the host has every package the job needs; no environment was built")
        elif built["built"]:
            panel.get().note(f"built environment {key} on host {client.host} in {built['seconds']:.1f} s")
        return key

    def _check_environment(self, client: AgentClient, submission: session.Submission, panel: Any) -> None:
        """Refuse before upload what could not load on the host; note other differences.

        Checked once per kernel, host, environment and set of packages: a
        cell with the same imports as the last one costs no round trip.
        """
        needed = session.needed_imports(submission)
        self._last_imports[client.host] = needed  # what %remote_env compares, refused or not
        where = (client.host, client.transport.python, client.transport.root, submission.env)
        key = (*where, tuple(needed))
        report = self._checked_environments.get(key)
        if report is None:
            report = session.environment_report(client, needed, submission.env, submission.module_imports)
            if report.blocking():
                raise HostSetupError(report.refusal())
            self._checked_environments[key] = report
            for row in report.warnings():
                there = row.host or "missing"
                panel.get().note(f"{row.package} is {row.here} here but {there} on host {client.host}; {row.fix}")

    @magic_arguments()
    @host_argument
    @argument("job", nargs="?", help="a job id: show its detail and last log lines")
    @line_magic
    def remote_status(self, line: str) -> StatusTable | JobDetail:
        """List jobs (state, epoch, last loss, timing), or one job in detail.

        Without --host: every job this machine submitted, on every host.
        """
        args = parse_argstring(self.remote_status, line)
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
    @job_argument
    @argument(
        "--checkpoint",
        action="store_true",
        help="inject the model from the job's last checkpoint (for a job that was killed or is still running)",
    )
    @line_magic
    def remote_attach(self, line: str) -> None:
        """Replay a job's events, follow it live, and inject its outputs when it ends."""
        args = parse_argstring(self.remote_attach, line)
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

    @magic_arguments()
    @host_argument
    @job_argument
    @argument("patterns", help="comma-separated globs of the job's files, relative to its working folder")
    @argument("--overwrite", action="store_true", help="replace local files that have other content")
    @line_magic
    def remote_fetch(self, line: str) -> None:
        """Bring files a job wrote on the host into this working folder (same relative paths)."""
        args = parse_argstring(self.remote_fetch, line)
        job_id = _job_id(args.job)
        client = self._client(self._job_host(job_id, args.host))
        request = session.FileFetch(_list(args.patterns), os.getcwd(), args.overwrite)
        for note in session.fetch_files(client, job_id, request, self.lifecycle.cache()):
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
        args = parse_argstring(self.remote_env, line)
        client = self._client(args.host)
        client.hello()
        base = [name for name in session.BASE_PACKAGES if session.has_distribution(name)]
        needed = list(dict.fromkeys([*base, *self._last_imports.get(client.host, [])]))
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
        args = parse_argstring(self.remote_cancel, line)
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
    @argument("--older-than", default="7d", help="age of finished jobs to remove: 30m, 12h, 7d, 0 (default 7d)")
    @argument(
        "--include-unfetched", action="store_true", help="also remove finished jobs whose outputs were never fetched"
    )
    @argument("--dry-run", action="store_true", help="only say what would be removed")
    @line_magic
    def remote_gc(self, line: str) -> None:
        """Remove finished jobs and the blobs no job references, on one host.

        Running jobs are never touched; finished jobs whose outputs were not
        fetched are kept unless --include-unfetched.
        """
        args = parse_argstring(self.remote_gc, line)
        older_than = _seconds(args.older_than)
        client = self._client(args.host)
        result = client.gc(older_than, args.include_unfetched, args.dry_run)
        if not args.dry_run:
            self.registry.remove(client.host, set(result["removed_jobs"]))
        verb = "would remove" if args.dry_run else "removed"
        agents = len(result.get("removed_agents", []))
        print(
            f"host {client.host}: {verb} {len(result['removed_jobs'])} jobs, {result['removed_blobs']} blobs "
            f"and {agents} old agent versions ({result['freed_bytes'] / 1e6:.1f} MB)"
        )
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

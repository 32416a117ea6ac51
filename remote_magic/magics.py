"""``%%remote_train`` and friends: parse the options, make one session call, render what comes back.

User mistakes are ``UsageError``s, raised before anything is sent; the options
and the checks that need no host are ``magic_options``'s.  The job's life is
``session``'s (``session.request`` turns the options into what a job
asks of its host), sweeps are ``sweep``'s, the panels are ``ui``'s.  Defaults
are traitlets, so they can be set in ``ipython_config.py`` or with
``%config RemoteMagics.default_host = "gpu1"``.
"""

from __future__ import annotations

import os
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from traitlets import Bool, Enum, Float, Int, Unicode

from . import project, session
from .agent import protocol
from .config import hosts_trait, ssh_config_trait
from .magic_options import (
    MagicHints,
    age_seconds,
    attach_arguments,
    checked_job_id,
    gc_arguments,
    gpu_options,
    host_argument,
    job_argument,
    out_names,
    parse,
    path_list,
    project_options,
    slurm_options,
    sweep_name,
    sweep_options,
    train_arguments,
    train_options,
    typed_id,
    usage_errors,
)
from .project import ProjectError, envcheck, payload
from .project.capture import CaptureError
from .project.notebook import hosts_to_warm
from .project.payload import PayloadError
from .registry import Registry
from .session import request
from .session.job_view import format_size
from .sweep import FoundSweep, Sweep, SweepError, SweepRun, find_sweep, new_sweep, submit_trials
from .transport import LOCAL_HOST
from .ui.panel import PanelWhenNeeded, make_panel
from .ui.status import JobDetail, StatusTable
from .ui.sweep_panel import make_sweep_panel
from .wire import compression, upload
from .wire.cache import DEFAULT_CACHE_LIMIT
from .wire.client import AgentClient

# How long the warm-ups at %load_ext may take, all hosts together, before unloading stops waiting for them.
PREWARM_WAIT_SECONDS = 300.0


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
        help="When the extension loads, connect in the background to the hosts the notebook's %%remote_train "
        "cells name (the default host if one names none, or the notebook is not known) and start their warm "
        "runners, so the first cell does not wait for the connection, the agent and the imports.",
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
        self.environment_checks = session.EnvironmentChecks()
        self._slow_path_noted: set[str] = set()  # hosts whose failed bulk path the user was told about
        self.connections = session.Connections()
        self.registry = Registry()
        self.lifecycle = session.JobLifecycle(session.Injector(self.shell), MagicHints())  # between cells
        self._background = session.BackgroundWork()  # prewarm and cells' connects: waited for when unloading
        self._background.start(envcheck.installed_modules)  # what the first cell's environment check reads
        if self.prewarm and self.warm_runner:
            self._background.start(self._prewarm)

    def _prewarm(self) -> None:
        """Make the hosts the notebook's cells name ready while its first cells run (the default host if unknown).

        Each in a thread of its own, so that one that does not answer holds up no other; quiet: a host that
        cannot be reached now says so when a cell asks for it, as without this (its error stays in its future).
        """
        warming = session.BackgroundWork()
        for host in hosts_to_warm(self._notebook_path(), self.default_host):
            warming.start(lambda host=host: session.prewarm(self._client(host), self.connections.settings_for(host)))
        warming.join(PREWARM_WAIT_SECONDS)  # unloading waits for this thread, so that none logs in after it

    @property
    def background(self) -> list[session.BackgroundFollower]:
        return self.lifecycle.background

    # ------------------------------------------------------------- helpers
    def _client(self, host: str | None, python: str | None = None) -> AgentClient:
        self.connections.hosts, self.connections.ssh_config = self.hosts, self.ssh_config  # %config may change them
        self.lifecycle.reconnect_timeout, self.lifecycle.cache_limit = self.reconnect_timeout, self.cache_limit
        try:
            return self.connections.get(host or self.default_host, python)
        except session.OneLineError as exc:  # names the setting itself
            raise UsageError(str(exc)) from None
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
        self._background.join(timeout)
        self.lifecycle.stop_background(timeout)

    # -------------------------------------------------------------- magics
    @magic_arguments()
    @host_argument
    @train_arguments
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
        args = parse(self.remote_train, line)
        options, grid, fetch = train_options(args, self.shell.user_ns)
        client = self._client(args.host, args.python)
        # Connect (and bring up the bulk path) while the inputs are pickled and hashed: on a fresh kernel the
        # connection is ready when they are.
        connecting = self._background.start(lambda: session.connected(client))
        hashes = project.HashCache()  # a sweep's trials share their files: each is hashed once
        submissions = [self._prepare(cell, args, params, hashes) for params in ([{}] if grid is None else grid)]
        # Hash the inputs' buffers while the environment is checked (both need seconds for GiBs or a new set
        # of imports; hashlib lets go of the GIL).
        seen: dict[tuple[int, int], str] = {}  # a sweep's trials share their arrays: each is hashed once
        hashing = self._background.start(lambda: [submission.payload.hash(seen) for submission in submissions])
        settings = self.connections.settings_for(args.host or self.default_host)
        host = request.HostFacts.from_hello(client.host, settings, connecting.result())
        with usage_errors(request.RequestError):
            job = request.job_request(options, host, None if grid is None else len(grid))
        sweep = (
            None if grid is None else new_sweep(client.host, grid, job.parallel, args.metric, args.mode, args.as_name)
        )
        panel = self._panel_for(client.host, sweep)
        for submission in submissions:
            job.apply(submission)
        pickling = (note for submission in submissions for note in submission.payload.notes)  # a shuffle order
        for note in dict.fromkeys((*job.notes, *pickling)):
            panel.note(note)
        with usage_errors(ProjectError):
            self.environment_checks.prepare(client, args.env, submissions, panel.progress, panel.note)
        hashing.result()
        if sweep is None:
            self._submit_job(client, submissions[0], args, fetch, panel)
        else:
            self._submit_sweep(client, sweep, submissions, args, panel)

    def _prepare(self, cell: str, args: Any, params: dict[str, Any], hashes: project.HashCache) -> session.Submission:
        """The cell as one job; a sweep's trial sees its parameters as variables (sent, whether or not defined here)."""
        shell = self.shell
        with usage_errors(CaptureError, PayloadError, ProjectError):
            submission = session.prepare(
                cell,
                {**shell.user_ns, **params} if params else shell.user_ns,
                set(shell.user_ns_hidden) - set(params),
                outputs=out_names(args.out),
                name=args.name,
                files=path_list(args.files, "--files") if args.files else None,
                ship_modules=self.ship_modules == "auto",
                extra_modules=path_list(args.modules, "--modules") if args.modules else None,
                hashes=hashes,
                hash_buffers=False,  # hashed beside the connection and the environment check
            )
        submission.checkpoint_every = args.checkpoint_every
        submission.warm = self.warm_runner
        submission.compress = args.compress or self.compress
        submission.workdir = args.workdir
        submission.backend = args.backend or session.kernel_backend()
        return submission

    def _panel_for(self, host: str, sweep: Sweep | None) -> PanelWhenNeeded:
        if sweep is None:
            return PanelWhenNeeded(lambda: make_panel(host, self.panel))
        return PanelWhenNeeded(lambda: make_sweep_panel(sweep, self.panel))

    def _submit_job(
        self,
        client: AgentClient,
        submission: session.Submission,
        args: Any,
        fetch: session.FileFetch | None,
        panel: PanelWhenNeeded,
    ) -> None:
        """Submit the job and record it; follow it here, or with --detach in the background (in a kernel)."""
        with usage_errors(upload.FileChanged):
            job_id = session.submit(client, submission, progress=session.shown_progress(panel.progress, "uploading"))
        self._note_slow_path(client, panel)
        self.registry.add(client.host, job_id, args.name, self._notebook_path())
        if fetch is not None:  # where this folder lies in the job's layout: files land in it, never above
            fetch.layout_cwd = submission.cwd
        if args.detach:
            print(
                f"job {job_id} submitted to host {client.host}; it runs on.\n"
                f"  to list it:         %remote_status --host {client.host}\n"
                f"  to follow it again: %remote_attach {job_id} --host {client.host}  (brings its outputs back)"
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
        panel: PanelWhenNeeded,
    ) -> None:
        """Submit every trial (the host keeps to --parallel), then follow them all into one panel."""
        with usage_errors(upload.FileChanged):
            submit_trials(
                client,
                sweep,
                submissions,
                self.registry,
                args.name,
                self._notebook_path(),
                session.shown_progress(panel.progress, "uploading"),
            )
        run = SweepRun(client, sweep, panel.get(), self.lifecycle, inject=not args.no_inject)
        if args.detach:
            print(
                f"sweep {sweep.id}: {len(sweep.trials)} trials submitted to host {client.host}, "
                f"{sweep.parallel} at a time; they run on.\n"
                f"  to list its trials:        %remote_status {sweep.id} --host {client.host}\n"
                f"  to follow the sweep again: %remote_attach {sweep.id} --host {client.host}"
                f"  (brings back {sweep.name or 'sweep'})"
            )
            if self._kernel_stays_alive():
                panel.get().start()
                run.start(detached=True)
            return
        panel.get().start()
        run.start()
        run.wait()

    def _note_slow_path(self, client: AgentClient, panel: PanelWhenNeeded) -> None:
        """Say once per host when `ssh` exists but could not carry the large blobs (they went the slower way)."""
        if client.bulk_failure is None or client.host in self._slow_path_noted:
            return
        self._slow_path_noted.add(client.host)
        panel.note(
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
        args = parse(self.remote_status, line)
        if args.job and protocol.is_sweep_id(typed_id(args.job)):
            found = self._find_sweep(typed_id(args.job), args.host, "remote_status")
            client, ids = found.client, set(found.job_ids)
            return StatusTable(client.host, [row for row in client.status() if row["job_id"] in ids])
        if args.job:
            job_id = checked_job_id(args.job)
            client = self._client(self._job_host(job_id, args.host))
            return JobDetail(client.host, client.status(job_id))
        if args.host:
            client = self._client(args.host)
            return StatusTable(client.host, client.status(), client.gpus())
        return StatusTable(None, session.registered_jobs(self.registry.records(), self._client))

    @magic_arguments()
    @host_argument
    @attach_arguments
    @line_magic
    def remote_attach(self, line: str) -> None:
        """Replay a job's events, follow it live, and inject its outputs when it ends.

        For a sweep: follow every trial into one panel, then inject the sweep object.
        """
        args = parse(self.remote_attach, line)
        if protocol.is_sweep_id(typed_id(args.job)):
            self._attach_sweep(typed_id(args.job), args)
            return
        if args.as_name is not None:
            raise UsageError("--as names the object of a sweep: give a sweep's id (sweep-...)")
        job_id = checked_job_id(args.job)
        client = self._client(self._job_host(job_id, args.host))
        if args.checkpoint:
            values, meta = session.fetch_checkpoint(client, job_id)
            self.shell.user_ns.update(values)
            for note in values.notes:  # e.g. tensors that were on a GPU there are on the CPU here
                print(note)
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
        name = sweep_name(args.as_name)
        found = self._find_sweep(sweep_id, args.host, "remote_attach")
        sweep = found.sweep(name)
        panel = make_sweep_panel(sweep, self.panel)
        panel.start()
        run = SweepRun(found.client, sweep, panel, self.lifecycle)
        run.start()
        run.wait()

    def _find_sweep(self, sweep_id: str, host: str | None, magic: str) -> FoundSweep:
        """A sweep's host and trials: from the registry when this machine submitted it, else from ``host``."""
        with usage_errors(SweepError):
            return find_sweep(sweep_id, host, self.registry, self._client, magic)

    @magic_arguments()
    @host_argument
    @job_argument
    @argument("patterns", help="comma-separated globs of the job's files, relative to its working folder")
    @argument("--overwrite", action="store_true", help="replace local files that have other content")
    @line_magic
    def remote_fetch(self, line: str) -> None:
        """Bring files a job wrote on the host into this working folder (same relative paths)."""
        args = parse(self.remote_fetch, line)
        job_id = checked_job_id(args.job)
        client = self._client(self._job_host(job_id, args.host))
        wanted = session.FileFetch(path_list(args.patterns, "%remote_fetch"), os.getcwd(), args.overwrite)
        for note in session.fetch_files(client, job_id, wanted, self.lifecycle.cache()):
            print(note)

    @magic_arguments()
    @host_argument
    @argument("--python", help="the host's interpreter to compare with, as in %%%%remote_train (default: python3)")
    @argument("--env", metavar="FILE|auto", help="compare with this environment on the host (built if needed)")
    @line_magic
    def remote_env(self, line: str) -> Any:
        """This kernel's Python and packages next to the host's: the table of versions on both sides.

        Lists the packages of the last cell sent to the host, and
        cloudpickle, numpy, Keras and its backend, PyTorch and JAX where this
        kernel has them: first what would refuse a job, then what only
        differs, then what matches.
        """
        args = parse(self.remote_env, line)
        client = self._client(args.host, args.python)
        client.hello()
        base = [name for name in session.BASE_PACKAGES if session.has_distribution(name)]
        needed = list(dict.fromkeys([*base, *self.environment_checks.last_imports.get(client.host, [])]))
        env = None
        if args.env:
            empty = session.Submission("", [], [], payload.pack({}, {}), imports=needed)
            panel = PanelWhenNeeded(lambda: make_panel(client.host, "text"))
            with usage_errors(ProjectError):
                env = session.build_environment(client, args.env, empty, panel.progress, panel.note)
        return session.environment_report(client, needed, env or None)

    @magic_arguments()
    @host_argument
    @job_argument
    @line_magic
    def remote_cancel(self, line: str) -> None:
        """Stop a job now: its whole process group is ended (SIGTERM, then SIGKILL)."""
        args = parse(self.remote_cancel, line)
        if protocol.is_sweep_id(typed_id(args.job)):
            found = self._find_sweep(typed_id(args.job), args.host, "remote_cancel")
            client = found.client
            ended = sum(1 for job_id in found.job_ids if client.cancel(job_id).get("cancelled"))
            print(
                f"sweep {found.id} on host {client.host}: cancelled {ended} of its {len(found.trials)} trials "
                f"(the others had ended)"
            )
            return
        job_id = checked_job_id(args.job)
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
    @gc_arguments
    @line_magic
    def remote_gc(self, line: str) -> None:
        """Remove finished jobs, the blobs no job references and the environments no job used lately, on one host.

        Running jobs are never touched, nor the environments they or a warm
        runner use; finished jobs whose outputs were not fetched are kept
        unless --include-unfetched.
        """
        args = parse(self.remote_gc, line)
        older_than = age_seconds(args.older_than)
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

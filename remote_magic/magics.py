"""``%%remote_train`` and friends: argument parsing and user errors only.

Everything else is delegated: ``session`` runs the job's life, ``ui`` shows
it.  Defaults are traitlets, so they can be set in ``ipython_config.py`` or
with ``%config RemoteMagics.default_host = "gpu1"``.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Bool, Dict, Enum, Float, Unicode

from . import session
from .capture import CaptureError
from .errors import RemoteMagicError
from .payload import PayloadError
from .registry import Registry
from .transport import LOCAL_HOST, Transport, compression
from .ui.panel import TextPanel, make_panel
from .ui.status import JobDetail, StatusTable


def host_argument(func: Any) -> Any:
    return argument(
        "--host",
        help="an alias from ~/.ssh/config, or user@host[:port]; default: RemoteMagics.default_host "
        "('local' runs the job in a subprocess on this machine)",
    )(func)


def job_argument(func: Any) -> Any:
    return argument("job", help="the job id, as shown by %%remote_status")(func)


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
    hosts = Dict(
        help="Per-host settings, e.g. {'gpu1': {'python': '/opt/venv/bin/python', 'root': '~/.remote_magic'}}."
    ).tag(config=True)
    ssh_config = Unicode(
        os.environ.get("REMOTE_MAGIC_SSH_CONFIG", os.path.join("~", ".ssh", "config")),
        help="The OpenSSH client config to read host aliases from ($REMOTE_MAGIC_SSH_CONFIG).",
    ).tag(config=True)
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

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell, **kwargs)
        self.connections = session.Connections()
        self.registry = Registry()
        self.background: list[session.BackgroundFollower] = []

    # ------------------------------------------------------------- helpers
    def _transport(self, host: str | None, python: str | None = None) -> Transport:
        self.connections.hosts, self.connections.ssh_config = self.hosts, self.ssh_config  # %config may change them
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

    def _follow_and_inject(self, transport: Transport, job_id: str, panel: TextPanel, inject: bool = True) -> None:
        """Show the job until it ends, then put its outputs into the namespace.

        The first interrupt (or the Stop button) asks the host to stop after
        the current batch and still returns the partly trained outputs; a
        second interrupt cancels.  The Detach button returns at once and
        follows the job in the background.
        """
        detach = threading.Event()
        panel.set_actions(on_stop=lambda: session.request_stop(transport, job_id), on_detach=detach.set)

        def follow(from_seq: int) -> dict[str, Any] | None:
            return session.follow(
                transport, job_id, panel.handle, from_seq=from_seq, reconnect_timeout=self.reconnect_timeout,
                on_reconnecting=lambda reason: panel.note(f"reconnecting: {reason}"),
                keep_going=lambda: not detach.is_set(),
            )  # fmt: skip

        try:
            final = follow(0)
        except KeyboardInterrupt:
            try:
                panel.note("interrupted: the host stops training after the current batch (interrupt again to cancel)")
                session.request_stop(transport, job_id)
                final = follow(panel.view.next_seq)
            except KeyboardInterrupt:
                self._cancel_and_fall_back_to_checkpoint(transport, job_id, panel)
                return
        if final is None:
            panel.note("detached: the job runs on; this panel keeps updating while the kernel is idle")
            self._follow_in_background(transport, job_id, panel, inject, from_seq=panel.view.next_seq)
            return
        try:
            self._end_job(transport, job_id, panel, final, inject)
        finally:
            panel.finish()

    def _cancel_and_fall_back_to_checkpoint(self, transport: Transport, job_id: str, panel: TextPanel) -> None:
        """A second interrupt: kill the job, and inject the model of its last checkpoint if it has one."""
        try:
            session.cancel(transport, job_id)
            try:
                values, meta = session.fetch_checkpoint(transport, job_id)
            except RemoteMagicError:
                panel.note(f"job {job_id} cancelled; it had no checkpoint, nothing was injected")
                raise KeyboardInterrupt from None
            self.shell.user_ns.update(values)
            panel.note(
                f"job {job_id} cancelled; injected {', '.join(values)} from the checkpoint of epoch "
                f"{meta['epoch']} of {meta.get('epochs') or '?'}"
            )
        finally:
            panel.finish()

    def _end_job(
        self, transport: Transport, job_id: str, panel: TextPanel, final: dict[str, Any], inject: bool
    ) -> None:
        session.raise_for_final(final, job_id, transport.host)
        if final.get("stopped"):
            panel.note(f"stopped at epoch {panel.view.epoch} of {panel.view.epochs or '?'}")
        if not inject:
            panel.note(f"finished; outputs not injected (--no-inject): `%remote_attach {job_id}` fetches them")
            return
        values = session.fetch_outputs(transport, job_id, final)
        self.shell.user_ns.update(values)
        panel.note(f"injected: {session.describe_injection(list(values))}")

    def _follow_in_background(
        self, transport: Transport, job_id: str, panel: TextPanel, inject: bool, from_seq: int = 0
    ) -> None:
        """Keep the panel live while the kernel is idle; inject the outputs when the job ends."""

        def on_end(final: dict[str, Any]) -> None:
            try:
                self._end_job(transport, job_id, panel, final, inject)
            except Exception as exc:  # noqa: BLE001  (shown in the panel: there is no cell to raise into)
                panel.note(f"{type(exc).__name__}: {exc}")
            finally:
                panel.finish()

        follower = session.BackgroundFollower(
            transport, job_id, panel.handle, on_end, from_seq=from_seq, reconnect_timeout=self.reconnect_timeout
        )
        panel.set_actions(on_stop=lambda: session.request_stop(transport, job_id), on_detach=None)
        self.background.append(follower)
        follower.start()

    def stop_background(self, timeout: float = 5.0) -> None:
        """Stop following detached jobs (they run on); used when the extension unloads."""
        for follower in self.background:
            follower.stop()
        for follower in self.background:
            follower.join(timeout)
        self.background.clear()

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
    @cell_magic
    def remote_train(self, line: str, cell: str) -> None:
        """Run this cell on a host and bring back what it assigned.

        The variables the cell reads are sent; each Keras epoch is shown live;
        when the cell ends, the variables it assigns (and inputs it trains or
        changes in place, such as a model whose fit ran) appear here.
        """
        args = parse_argstring(self.remote_train, line)
        shell = self.shell
        try:
            submission = session.prepare(
                cell, shell.user_ns, set(shell.user_ns_hidden), outputs=_names(args.out), name=args.name
            )
        except (CaptureError, PayloadError) as exc:
            raise UsageError(str(exc)) from None
        submission.checkpoint_every = args.checkpoint_every
        submission.warm = self.warm_runner
        submission.compress = args.compress or self.compress
        transport = self._transport(args.host, args.python)
        session.check_host(transport, submission, shell.user_ns)
        job_id = session.submit(transport, submission)
        self.registry.add(transport.host, job_id, args.name, self._notebook_path())
        if args.checkpoint_every < 0:
            raise UsageError("--checkpoint-every takes a number of epochs, 0 or more")
        if args.detach:
            print(
                f"job {job_id} submitted to host {transport.host}; it runs on. "
                f"`%remote_status --host {transport.host}` lists it, "
                f"`%remote_attach {job_id} --host {transport.host}` follows it and brings its outputs back."
            )
            if self._kernel_stays_alive():
                panel = make_panel(transport.host, self.panel)
                panel.start(job_id, args.name)
                self._follow_in_background(transport, job_id, panel, not args.no_inject)
            return
        panel = make_panel(transport.host, self.panel)
        panel.start(job_id, args.name)
        self._follow_and_inject(transport, job_id, panel, inject=not args.no_inject)

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
            transport = self._transport(self._job_host(args.job, args.host))
            return JobDetail(transport.host, session.status(transport, args.job))
        if args.host:
            transport = self._transport(args.host)
            return StatusTable(transport.host, session.status(transport))
        return StatusTable(None, session.registered_jobs(self.registry.records(), self._transport))

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
        transport = self._transport(self._job_host(args.job, args.host))
        if args.checkpoint:
            values, meta = session.fetch_checkpoint(transport, args.job)
            self.shell.user_ns.update(values)
            print(
                f"injected {', '.join(values)} from the checkpoint of job {args.job} on host {transport.host} "
                f"at epoch {meta['epoch']} of {meta.get('epochs') or '?'}"
            )
            return
        panel = make_panel(transport.host, self.panel)
        panel.start(args.job)
        self._follow_and_inject(transport, args.job, panel)

    @magic_arguments()
    @host_argument
    @job_argument
    @line_magic
    def remote_cancel(self, line: str) -> None:
        """Stop a job now: its whole process group is ended (SIGTERM, then SIGKILL)."""
        args = parse_argstring(self.remote_cancel, line)
        transport = self._transport(self._job_host(args.job, args.host))
        result = session.cancel(transport, args.job)
        if result.get("cancelled"):
            print(f"job {args.job} on host {transport.host} cancelled")
        else:
            print(f"job {args.job} on host {transport.host} was not running (state: {result.get('state')})")

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
        transport = self._transport(args.host)
        result = session.collect_garbage(transport, _seconds(args.older_than), args.include_unfetched, args.dry_run)
        if not args.dry_run:
            self.registry.remove(transport.host, set(result["removed_jobs"]))
        verb = "would remove" if args.dry_run else "removed"
        print(
            f"host {transport.host}: {verb} {len(result['removed_jobs'])} jobs and {result['removed_blobs']} blobs "
            f"({result['freed_bytes'] / 1e6:.1f} MB)"
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
        return float(number) * (unit or 1)
    except ValueError:
        raise UsageError(f"--older-than takes an age such as 30m, 12h or 7d, not {text!r}") from None

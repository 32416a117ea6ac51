"""A cell's job options, checked against its host, become what each of its submissions carries.

The options come as typed (``JobOptions``), the host as its settings and its
hello describe it (``HostFacts``); ``job_request`` checks one against the
other before anything is sent and parses the GPU request once, into the
``GpuRequest`` that then travels in the spec as is.  A mistake is a
``RequestError`` that names the option and the fix: a ``ValueError``, not
IPython's ``UsageError``, because this layer serves the REST API as well as
the magics (magics.py shows it as a ``UsageError``).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from ..agent.protocol import PROCESS_LAUNCHER, SLURM_LAUNCHER, GpuRequest
from .hosts import HostSettings, SlurmSettings

if TYPE_CHECKING:
    from .submission import Submission


class RequestError(ValueError):
    """An option that cannot make a job on this host; the message names it and says what works."""


def option_list(text: str) -> list[str]:
    """A comma-separated option value, quotes and spaces around items tolerated."""
    return [item.strip() for item in text.strip().strip("'\"").split(",") if item.strip()]


def host_launcher(settings: HostSettings, hello: Mapping[str, Any] | None = None) -> str:
    """Which launcher runs the host's jobs: as its agent says at hello, else as its settings say.

    The one place that decides; agents that do not report ``launcher`` leave it to the settings.
    """
    reported = (hello or {}).get("launcher")
    if reported in (SLURM_LAUNCHER, PROCESS_LAUNCHER):
        return str(reported)
    return SLURM_LAUNCHER if settings.slurm is not None else PROCESS_LAUNCHER


@dataclass(frozen=True)
class HostFacts:
    """What a request is checked against: the host's name, settings, launcher and GPUs."""

    name: str
    settings: HostSettings
    launcher: str
    gpus: int  # the GPUs its nvidia-smi lists (none is counted on a Slurm login node)

    @classmethod
    def from_hello(cls, name: str, settings: HostSettings, hello: Mapping[str, Any]) -> HostFacts:
        launcher = host_launcher(settings, hello)
        return cls(name, settings, launcher, len(hello.get("gpus") or []) if launcher == PROCESS_LAUNCHER else 0)

    @property
    def slurm(self) -> SlurmSettings | None:
        """The defaults of a Slurm host's jobs (Slurm's own where only the agent said it is one); else None."""
        if self.launcher != SLURM_LAUNCHER:
            return None
        return self.settings.slurm or SlurmSettings()


@dataclass(frozen=True)
class JobOptions:
    """A cell's job options as typed (None where not given); checked alone here, against a host by ``job_request``."""

    gpus: str | None = None
    gpu_ids: str | None = None
    time: str | None = None
    partition: str | None = None
    slurm: str | None = None  # more sbatch options, as one string
    tasks: int | None = None
    nodes: int | None = None
    parallel: int | None = None  # a sweep's trials at once

    def __post_init__(self) -> None:
        if self.gpus is not None and self.gpu_ids is not None:
            raise RequestError("--gpus and --gpu-ids do not go together: give a count, or the GPUs themselves")

    @classmethod
    def pick(cls, values: Mapping[str, Any]) -> JobOptions:
        """The job options among ``values`` (a parsed command line as a dict)."""
        return cls(**{option.name: values.get(option.name) for option in fields(cls)})


@dataclass(frozen=True)
class JobRequest:
    """What every submission of one cell carries, from its options and its host."""

    gpus: GpuRequest
    slurm: dict[str, Any] | None = None  # a Slurm job's sbatch options (its GPUs are in ``gpus``)
    busy_gpu_memory: int | None = None
    queue: str | None = None
    parallel: int | None = None  # a sweep's trials at once; None for one job
    notes: tuple[str, ...] = ()  # for the job's panel

    def apply(self, submission: Submission) -> None:
        submission.gpus = self.gpus
        submission.busy_gpu_memory, submission.queue = self.busy_gpu_memory, self.queue
        if self.slurm is not None:
            submission.slurm, submission.warm = self.slurm, False  # no warm runners on a login node


def job_request(options: JobOptions, host: HostFacts, trials: int | None = None) -> JobRequest:
    """The request of one job, or of each of a sweep's ``trials``; a ``RequestError`` before anything is sent."""
    sbatch = _sbatch_options(options, host)
    slurm = host.slurm
    gpus = _slurm_gpus(options, host.name, slurm) if slurm is not None else _host_gpus(options, host)
    defaulted = options.gpus is None and options.gpu_ids is None
    notes = [f"using 1 of {host.gpus} GPUs; --gpus all for all"] if defaulted and host.gpus > 1 and not trials else []
    return JobRequest(
        gpus,
        sbatch,
        busy_gpu_memory=host.settings.busy_gpu_memory if host.gpus else None,
        queue=host.settings.queue,
        parallel=None if trials is None else _parallel(options, host, gpus, trials),
        notes=tuple(notes),
    )


def _host_gpus(options: JobOptions, host: HostFacts) -> GpuRequest:
    """--gpus or --gpu-ids against the GPUs the host has (default: one, where it has any)."""
    count, ids, have = options.gpus, options.gpu_ids, host.gpus
    none_there = f"host {host.name} has no GPUs (nvidia-smi finds none there)"
    if ids is not None:
        try:
            wanted = [int(i) for i in option_list(ids)]
        except ValueError:
            raise RequestError(f"--gpu-ids takes GPU numbers such as 2,3, not {ids!r}") from None
        if not have:
            raise RequestError(f"--gpu-ids {ids}: {none_there}; leave it out to run on the CPU")
        if any(not 0 <= i < have for i in wanted) or not wanted or len(set(wanted)) != len(wanted):
            raise RequestError(f"--gpu-ids {ids}: host {host.name} has GPUs 0 to {have - 1}, each once")
        return GpuRequest(ids=tuple(sorted(wanted)))
    if count is None:
        return GpuRequest(1 if have else 0)
    text = count.strip().strip("'\"").lower()
    if text == "all":
        if not have:
            raise RequestError(f"--gpus all: {none_there}; leave it out to run on the CPU")
        return GpuRequest(GpuRequest.ALL)
    if not text.isdigit():
        raise RequestError(f"--gpus takes a number of GPUs (0 for none) or 'all', not {count!r}")
    if int(text) > have:
        raise RequestError(f"--gpus {int(text)}: " + (f"host {host.name} has {have} GPUs" if have else none_there))
    return GpuRequest(int(text))


def _slurm_gpus(options: JobOptions, host: str, slurm: SlurmSettings) -> GpuRequest:
    """A count only (Slurm picks the GPUs); the host setting by default."""
    if options.gpu_ids is not None:
        raise RequestError(f"--gpu-ids: on Slurm host {host}, Slurm picks the GPUs; ask for a number with --gpus N")
    if options.gpus is None:
        return GpuRequest(slurm.gpus)
    text = options.gpus.strip().strip("'\"").lower()
    if not text.isdigit():
        raise RequestError(
            f"--gpus {options.gpus}: on Slurm host {host}, Slurm picks the GPUs; --gpus takes a number per job "
            "(0 for none)"
        )
    return GpuRequest(int(text))


def _sbatch_options(options: JobOptions, host: HostFacts) -> dict[str, Any] | None:
    """The host's Slurm settings with --time, --partition, --slurm, --tasks and --nodes on top; None off Slurm."""
    given = {
        "time": options.time,
        "partition": options.partition,
        "extra_args": options.slurm,
        "tasks": options.tasks,
        "nodes": options.nodes,
    }
    if host.slurm is None:
        used = [f"--{'slurm' if key == 'extra_args' else key}" for key, value in given.items() if value]
        if used:
            raise RequestError(
                f"{', '.join(used)}: host {host.name} is not a Slurm host; set 'scheduler': 'slurm' in its "
                "c.RemoteMagics.hosts entry if jobs there go through Slurm"
            )
        return None
    for option in ("tasks", "nodes"):
        if given[option] is not None and given[option] < 1:
            raise RequestError(f"--{option} takes a number, 1 or more, not {given[option]}")
    try:
        given["extra_args"] = shlex.split(options.slurm or "")
    except ValueError as exc:
        raise RequestError(f"--slurm {options.slurm!r}: {exc}") from None
    return host.slurm.job_options(given)


def _parallel(options: JobOptions, host: HostFacts, gpus: GpuRequest, trials: int) -> int:
    """A sweep's trials at once: --parallel; else all on Slurm (its scheduler spreads them); else as many as the
    host's GPUs hold at --gpus each, 1 without GPUs to share."""
    if options.parallel:
        return options.parallel
    if host.launcher == SLURM_LAUNCHER:
        return trials
    if not host.gpus or gpus.ids or gpus.count in (0, GpuRequest.ALL):
        return 1
    return max(1, host.gpus // gpus.count)

"""Host settings, read and checked once, and the pool of agent clients built from them.

A host's entry in ``c.RemoteMagics.hosts`` is plain data the user typed; it becomes a
``HostSettings`` the first time the host is used, and later uses get that same checked value.
A mistake in one host's entry is raised when that host is used, never for another host.
"""

from __future__ import annotations

import copy
import re
import threading
from dataclasses import dataclass, field, replace
from typing import Any

from ..transport import LOCAL_HOST, LocalTransport, SSHTransport
from ..transport.base import Transport
from ..wire.client import AgentClient

SLURM_SETTING_KEYS = ("partition", "account", "qos", "time", "sbatch_args", "setup", "gpus", "signal_grace")


@dataclass(frozen=True)
class SlurmSettings:
    """A Slurm host's defaults for its jobs (``scheduler: "slurm"`` in the host's settings)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None  # Slurm's --time, e.g. "2:00:00"
    sbatch_args: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)  # shell lines before Python in the job, e.g. module load
    gpus: int = 0  # a login node has no nvidia-smi to count from: the default GPU request
    signal_grace: int = 120  # seconds before the time limit that the job checkpoints and requeues itself

    def job_options(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """The job's ``slurm`` spec: these settings, ``overrides`` from the cell's options on top.

        Its GPUs are not among them: they travel as the job's ``GpuRequest``, the same on every launcher.
        """
        options = {key: getattr(self, key) for key in SLURM_SETTING_KEYS if key != "gpus"}
        options.update({key: value for key, value in overrides.items() if value})
        return options


@dataclass(frozen=True)
class HostSettings:
    python: str | None = None
    root: str | None = None
    ssh_config: str | None = None
    busy_gpu_memory: int = 1024  # MiB that others' processes may use on a GPU the queue still counts as free
    queue: str | None = None  # a GPU queue folder shared by the host's users (default: one per host root)
    slurm: SlurmSettings | None = None  # scheduler: "slurm": jobs go through the cluster's queue
    bulk_ssh: str | None = "ssh"  # the OpenSSH client for large blobs (name on PATH or path); None: paramiko only

    @property
    def scheduler(self) -> str | None:
        """What the host is told at ``hello`` to run jobs with (None: its own processes)."""
        return "slurm" if self.slurm is not None else None


HOST_SETTING_KEYS = frozenset(
    {"python", "root", "busy_gpu_memory", "queue", "bulk_ssh", "scheduler", *SLURM_SETTING_KEYS}
)
_UNITS_MIB = {"kib": 1 / 1024, "k": 1 / 1024, "mib": 1, "m": 1, "gib": 1024, "g": 1024}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
ONE_LINE = (
    "values reach command lines and Slurm's batch script on the host, where it would start a new line "
    "(and sbatch drops the directives after it)"
)


class OneLineError(ValueError):
    """A host's name or setting that would not stay on one line; its message names the setting itself."""


def control_problem(value: str) -> str | None:
    """What in ``value`` would break out of its line in a shell command or a script: its first control character."""
    found = _CONTROL.search(value)
    if found is None:
        return None
    return "a line break" if found.group() in "\r\n" else f"the control character {found.group()!r}"


def _check_one_line(host: str, settings: dict[str, Any]) -> None:
    """The host's name and every string of its settings (python, root, partition, setup lines...) on one line."""
    problem = control_problem(host)
    if problem:
        raise OneLineError(f"the host name {host!r} has {problem} in it: {ONE_LINE}. Give it on one line")
    for key, value in settings.items():
        for item in value if isinstance(value, list | tuple) else [value]:
            problem = control_problem(item) if isinstance(item, str) else None
            if problem:
                raise OneLineError(
                    f"c.RemoteMagics.hosts[{host!r}][{key!r}] {item!r} has {problem} in it: {ONE_LINE}. Give each "
                    "value on one line (several setup lines go as a list of strings); nothing was sent"
                )


def memory_mib(value: object, setting: str) -> int:
    """A memory size as a setting gives it: a number of bytes, or text such as '1GiB', '512MiB', '2G'."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value // (1024 * 1024)
    text = str(value).strip().lower().replace(" ", "")
    number = text.rstrip("kmgib")
    unit = text[len(number) :]
    try:
        mib = float(number) * _UNITS_MIB[unit or "mib"] if unit else float(number) / (1024 * 1024)
    except (KeyError, ValueError):
        mib = -1
    if not mib >= 0:
        raise ValueError(f"{setting} takes a size such as '1GiB' or '512MiB' (or bytes), not {value!r}")
    return int(mib)


def read_host_settings(host: str, settings: dict[str, Any]) -> HostSettings:
    """A host's entry in ``c.RemoteMagics.hosts``, checked; ValueError naming the key that is wrong.

    ``OneLineError`` (a ValueError) first, for a value that would add lines to a command or a batch script.
    """
    _check_one_line(host, settings)
    unknown = set(settings) - HOST_SETTING_KEYS
    if unknown:
        raise ValueError(
            f"the settings of host {host!r} have unknown keys {sorted(unknown)}; "
            f"use {', '.join(repr(k) for k in sorted(HOST_SETTING_KEYS))}"
        )
    busy = settings.get("busy_gpu_memory")
    return HostSettings(
        python=settings.get("python"),
        root=settings.get("root"),
        busy_gpu_memory=memory_mib(busy, f"the busy_gpu_memory of host {host!r}") if busy is not None else 1024,
        queue=settings.get("queue"),
        slurm=_slurm_settings(host, settings),
        bulk_ssh=_bulk_ssh(host, settings),
    )


def _slurm_settings(host: str, settings: dict[str, Any]) -> SlurmSettings | None:
    """The Slurm part of a host's settings, checked: its keys mean nothing without ``scheduler: "slurm"``."""
    scheduler = settings.get("scheduler")
    given = sorted(key for key in SLURM_SETTING_KEYS if key in settings)
    if scheduler is None:
        if given:
            raise ValueError(f"the settings of host {host!r} have {given}, which only apply with 'scheduler': 'slurm'")
        return None
    if scheduler != "slurm":
        raise ValueError(f"host {host!r}: 'scheduler' can be 'slurm' (or left out for a plain host), not {scheduler!r}")
    slurm = SlurmSettings(**{key: settings[key] for key in given})
    for key in ("sbatch_args", "setup"):
        value = getattr(slurm, key)
        if isinstance(value, str) or not all(isinstance(item, str) for item in value):
            raise ValueError(f"host {host!r}: {key!r} takes a list of strings, not {value!r}")
    for key in ("gpus", "signal_grace"):
        value = getattr(slurm, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"host {host!r}: {key!r} takes a whole number, 0 or more, not {value!r}")
    return slurm


def _bulk_ssh(host: str, settings: dict[str, Any]) -> str | None:
    value = settings.get("bulk_ssh", "ssh")
    if value is None or value is False or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(
            f"host {host!r}: 'bulk_ssh' takes the OpenSSH client to use ('ssh', a path) or None, not {value!r}"
        )
    return value


def _transport(host: str, settings: HostSettings) -> Transport:
    if host == LOCAL_HOST:
        return LocalTransport(python=settings.python, root=settings.root)
    return SSHTransport(
        host,
        python=settings.python or "python3",
        root=settings.root,
        ssh_config=settings.ssh_config,
        bulk_ssh=settings.bulk_ssh,
    )


class Connections:
    """One agent client per host for the life of a kernel (or server), reopened after a drop.

    ``hosts`` holds per-host settings as in ``c.RemoteMagics.hosts``; assigning other settings
    (``%config`` may) has each host's read again when it is next used.
    """

    def __init__(self, hosts: dict[str, dict[str, Any]] | None = None, ssh_config: str | None = None) -> None:
        self._hosts: dict[str, dict[str, Any]] = {}
        self._read: dict[str, HostSettings] = {}
        self.hosts = hosts or {}
        self.ssh_config = ssh_config
        self._clients: dict[tuple[str, str | None, str | None, str | None], AgentClient] = {}
        self._lock = threading.Lock()

    @property
    def hosts(self) -> dict[str, dict[str, Any]]:
        return self._hosts

    @hosts.setter
    def hosts(self, hosts: dict[str, dict[str, Any]]) -> None:
        if hosts != self._hosts:  # a copy is kept: an entry changed in place later still reads as new
            self._hosts = copy.deepcopy(dict(hosts))
            self._read = {}

    def settings_for(self, host: str, python: str | None = None) -> HostSettings:
        """The host's checked settings (read once), with ``python`` instead of the host's where given."""
        settings = self._read.get(host)
        if settings is None:
            settings = self._read[host] = read_host_settings(host, self._hosts.get(host, {}))
        return replace(settings, python=python or settings.python, ssh_config=self.ssh_config)

    def get(self, host: str, python: str | None = None) -> AgentClient:
        settings = self.settings_for(host, python)
        key = (host, settings.python, settings.root, settings.scheduler)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = AgentClient(_transport(host, settings), scheduler=settings.scheduler)
                self._clients[key] = client
            return client

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close(final=True)
            self._clients.clear()

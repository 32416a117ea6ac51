"""The environment check before a job is sent: this kernel's package versions next to the host's.

A job whose outputs come back pickled needs the same major.minor of the packages that load them
on both ends; comparing first turns a failure at load time (after the training) into a refusal
before it, or an environment built on the host (``--env``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import sys
from collections.abc import Callable, Iterable
from typing import Any

from .. import project
from ..agent import protocol
from ..project import envcheck
from ..wire.client import AgentClient
from .submission import Submission

KERAS_BACKENDS = ("tensorflow", "jax", "torch", "numpy", "openvino")
# Distributions that provide the same import under another name on another machine (a CPU build here, a GPU one there).
_SAME_IMPORT = {
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-macos", "tensorflow-intel"),
    "jax": ("jax",),
    "torch": ("torch",),
}
# Always compared: what loading the inputs and the outputs takes.
_ALWAYS_NEEDED = ("cloudpickle", "numpy")
# What %remote_env compares even before a cell was sent.
BASE_PACKAGES = ("cloudpickle", "numpy", "keras", "tensorflow", "torch", "jax")


def has_distribution(import_name: str) -> bool:
    """Whether this kernel has the package installed (found, not imported)."""
    return importlib.util.find_spec(import_name) is not None


def kernel_backend() -> str | None:
    """The Keras backend of this kernel: the imported keras's, else $KERAS_BACKEND, else None (the host's default)."""
    keras = sys.modules.get("keras")
    if keras is not None:
        with contextlib.suppress(Exception):
            return str(keras.backend.backend())
    return os.environ.get("KERAS_BACKEND") or None


def expected_kernel_backend() -> str:
    """The backend this kernel's Keras has or will have once imported, without importing it (for a warm-up).

    As Keras decides: $KERAS_BACKEND, else the "backend" of $KERAS_HOME/keras.json (~/.keras), else tensorflow.
    """
    return kernel_backend() or protocol.default_backend()  # the agent's rule: the same code decides on both ends


def needed_imports(submission: Submission) -> list[str]:
    """Top-level modules whose versions matter for this job: its imports, plus Keras's backend where Keras is used."""
    names = list(dict.fromkeys([*_ALWAYS_NEEDED, *submission.imports, *submission.module_imports]))
    if "keras" in names:
        names.append(submission.backend or kernel_backend() or "tensorflow")
    return list(dict.fromkeys(names))


def environment_report(
    client: AgentClient, import_names: list[str], env: str | None = None, maybe_unused: Iterable[str] = ()
) -> envcheck.EnvReport:
    """This kernel's versions of the packages behind ``import_names`` next to the host's (or the env's there).

    ``maybe_unused``: imports found only inside the local modules sent (an
    optional import, a file the cell never uses): missing on the host, they
    are a warning, not a refusal.
    """
    distributions = envcheck.distributions_for(import_names)  # import -> distribution here
    local = envcheck.local_versions(distributions.values())
    asked = {dist: list(dict.fromkeys([dist, *_SAME_IMPORT.get(name, ())])) for name, dist in distributions.items()}
    answer = client.versions(sorted({d for names in asked.values() for d in names}), env)
    found = answer["versions"]
    remote = {dist: next((found.get(n) for n in names if found.get(n)), None) for dist, names in asked.items()}
    where = client.host + (" (its environment)" if env else "")
    python = client.hello()["python"]
    report = envcheck.compare(where, local, remote, platform.python_version(), answer["python"], python)
    soft = {distributions[name] for name in maybe_unused if name in distributions}
    for row in report.rows:
        if row.blocking and row.package in soft:
            row.blocking = False
            row.fix = f"only your local modules import it (optional?); if the job needs it: {row.fix}"
    report.rows.sort(key=lambda row: (not row.blocking, row.package))
    return report


def ensure_environment(
    client: AgentClient, env: str, submission: Submission, on_line: Callable[[str], None], cwd: str | None = None
) -> tuple[str, dict[str, Any]]:
    """Build (once) the host environment ``--env`` asks for: a requirements file, or ``auto``; (its key, build info).

    ``auto``: this kernel's versions of the job's packages that the host
    lacks or has in another major.minor; nothing to install means no env.
    """
    if env == "auto":
        report = environment_report(client, needed_imports(submission))
        requirements = "\n".join(envcheck.auto_requirements(report))
        if not requirements:
            return "", {"built": False, "seconds": 0.0, "empty": True}
    else:
        path = os.path.join(cwd or os.getcwd(), os.path.expanduser(env))
        try:
            with open(path, encoding="utf-8") as f:
                requirements = f.read()
        except OSError as exc:
            raise project.ProjectError(f"--env {env}: cannot read the requirements file ({exc.strerror})") from None
    built = client.ensure_env(requirements, on_line)
    return built["key"], built

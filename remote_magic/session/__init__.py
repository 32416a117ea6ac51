"""The client side of a job's life: host settings and connections, submit, follow, fetch, inject.

One module per concern (``hosts``, ``request``, ``submission``, ``environment``, ``env_checks``,
``background``, ``following``, ``fetch``, ``injection``, ``lifecycle``; ``job_view`` for what a panel
shows); this face hands on the names the magics, the server, sweeps and the tests call as
``session.X``.  Nothing here imports widgets or IPython (``injection`` is handed the shell).
"""

from .background import BackgroundWork, connected, prewarm
from .env_checks import EnvironmentChecks, build_environment
from .environment import (
    BASE_PACKAGES,
    KERAS_BACKENDS,
    ensure_environment,
    environment_report,
    expected_kernel_backend,
    has_distribution,
    kernel_backend,
    needed_imports,
)
from .fetch import FileFetch, fetch_bounds, fetch_checkpoint, fetch_files, fetch_outputs, shown_progress
from .following import (
    RECONNECT_TIMEOUT,
    BackgroundFollower,
    describe_injection,
    follow,
    raise_for_final,
    registered_jobs,
)
from .hosts import ONE_LINE, Connections, HostSettings, OneLineError, SlurmSettings, control_problem
from .injection import Injector
from .lifecycle import JobLifecycle
from .submission import Submission, prepare, submit

__all__ = [
    "BASE_PACKAGES", "KERAS_BACKENDS", "ONE_LINE", "RECONNECT_TIMEOUT", "BackgroundFollower", "BackgroundWork", "Connections",
    "EnvironmentChecks", "FileFetch", "HostSettings", "Injector", "JobLifecycle", "OneLineError", "SlurmSettings",
    "Submission", "build_environment", "connected", "control_problem", "describe_injection", "ensure_environment", "environment_report", "expected_kernel_backend", "fetch_bounds",
    "fetch_checkpoint", "fetch_files", "fetch_outputs", "follow", "has_distribution", "kernel_backend",
    "needed_imports", "prepare", "prewarm", "raise_for_final", "registered_jobs", "shown_progress", "submit",
]  # fmt: skip

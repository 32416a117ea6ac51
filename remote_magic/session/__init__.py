"""The client side of a job's life: host settings and connections, submit, follow, fetch, inject.

One module per concern (``hosts``, ``submission``, ``environment``, ``following``, ``fetch``,
``lifecycle``; ``job_view`` for what a panel shows); this face hands on the names the magics,
the server, sweeps and the tests call as ``session.X``.  Nothing here knows widgets or IPython.
"""

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
from .hosts import Connections, HostSettings, SlurmSettings
from .lifecycle import JobLifecycle
from .submission import Submission, prepare, submit

__all__ = [
    "BASE_PACKAGES", "KERAS_BACKENDS", "RECONNECT_TIMEOUT", "BackgroundFollower", "Connections", "FileFetch",
    "HostSettings", "JobLifecycle", "SlurmSettings", "Submission", "describe_injection", "ensure_environment",
    "environment_report", "expected_kernel_backend", "fetch_bounds", "fetch_checkpoint", "fetch_files",
    "fetch_outputs", "follow", "has_distribution", "kernel_backend", "needed_imports", "prepare",
    "raise_for_final", "registered_jobs", "shown_progress", "submit",
]  # fmt: skip

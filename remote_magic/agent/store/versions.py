"""What an interpreter has installed, and which Python it is: this one, or another (a built env's).

Another interpreter is asked by running a short standard-library script in
it (``run_python``); the versions come from distribution metadata, so no
package is imported.  Apart from ``envs.py`` because nothing here builds or
removes an environment: ``versions`` asks it of any interpreter, and the
builds use ``run_python`` only to read an interpreter's version and paths.
"""

from __future__ import annotations

import json
import re
import subprocess
from importlib import metadata

from .. import jobs


def _canonical(name: str) -> str:
    """PEP 503: ``-``, ``_`` and ``.`` are one character, case does not count."""
    return re.sub(r"[-_.]+", "-", name).lower()


# Run by another interpreter: standard library only, prints {canonical name: version}.
_VERSIONS_SCRIPT = """
import json, re, sys
from importlib import metadata, util
found = {}
for dist in metadata.distributions():
    name = dist.metadata["Name"]
    if name:
        found.setdefault(re.sub(r"[-_.]+", "-", name).lower(), dist.version)
print(json.dumps({n: found.get(n) for n in json.loads(sys.argv[1])}))
"""


def installed_versions(distributions: list[str], python: str | None = None) -> dict[str, str | None]:
    """Versions of ``distributions`` (None when missing), from metadata: no package is imported.

    ``python``: ask that interpreter (an env's) instead of this one.  The
    first distribution on its ``sys.path`` wins, as it would at import time.
    """
    wanted = {name: _canonical(name) for name in distributions}
    if python is None:
        found: dict[str, str] = {}
        for dist in metadata.distributions():
            name = dist.metadata["Name"]
            if name:
                found.setdefault(_canonical(name), dist.version)
        versions: dict[str, str | None] = {n: found.get(n) for n in set(wanted.values())}
    else:
        versions = json.loads(run_python(python, _VERSIONS_SCRIPT, json.dumps(sorted(set(wanted.values())))))
    return {name: versions.get(canonical) for name, canonical in wanted.items()}


def env_python_version(python: str) -> str:
    """``3.11.7``: the version of the interpreter at ``python``."""
    return run_python(python, "import platform; print(platform.python_version())").strip()


def run_python(python: str, script: str, *args: str, error: str | None = None) -> str:
    """stdout of ``python -c script args``; AgentError (with its stderr) when it fails."""
    try:
        done = subprocess.run([python, "-c", script, *args], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        raise jobs.AgentError(f"could not run {error or python}: {exc}") from None
    if done.returncode != 0:
        last = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise jobs.AgentError(f"{error or python} failed (exit status {done.returncode}): {last}")
    return done.stdout

"""The batch script the agent hands to sbatch, rendered without a cluster and compared to golden files.

submitit's ``_sbatch_test_record.txt`` is the model: any change to a directive, to the node check or to the
launch line shows up here as a diff.  The host root and the interpreter vary between machines, so they are
written as ``<ROOT>`` and ``<PYTHON>``; everything else is fixed (job ids, agent version, options).

After an intended change: ``REMOTE_MAGIC_UPDATE_GOLDEN=1 pytest tests/test_sbatch_script.py``, then read the
diff of tests/golden/ before committing it.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest

from remote_magic.agent.launch import slurm

GOLDEN = Path(__file__).resolve().parent / "golden"
AGENT = "0123456789abcdef"
FIT = "20261127-103000-1a2b3c"
TRIALS = ["20261127-103001-00000a", "20261127-103001-00000b", "20261127-103001-00000c"]
SWEEP = "sweep-20261127-103001-5eed00"

# name -> (spec, the job ids the script runs: several make a job array).  The job's GPUs are its GPU request
# (``gpus``), as on every launcher.
JOBS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "gpu": (
        {"job_id": FIT, "name": "fit", "source": "", "gpus": 1, "slurm": {"partition": "gpu", "time": "1:00:00"}},
        [FIT],
    ),
    "sweep_array": (
        {
            "job_id": TRIALS[-1],
            "name": "fit lr=0.1",
            "source": "",
            "gpus": 1,
            "sweep": {"id": SWEEP, "trial": 2, "trials": 3, "parallel": 2},
            "slurm": {"partition": "gpu"},
        },
        TRIALS,
    ),
    "multi_task": (
        {"job_id": FIT, "name": "ddp", "source": "", "gpus": 2, "slurm": {"tasks": 2, "nodes": 2}},
        [FIT],
    ),
}


def earlier_client(spec: dict[str, Any]) -> dict[str, Any]:
    """The same job as an earlier client wrote it: its GPUs in its Slurm options, ``gpus`` 0."""
    return {**spec, "gpus": 0, "launcher": "slurm", "slurm": {**spec["slurm"], "gpus": spec["gpus"]}}


def render(root: Path, spec: dict[str, Any], job_ids: list[str]) -> str:
    """The script for ``spec``, with this machine's root and interpreter replaced by placeholders."""
    for job_id in job_ids:
        (root / "jobs" / job_id).mkdir(parents=True, exist_ok=True)
    for varying in (str(root), sys.executable):
        assert shlex.quote(varying) == varying, f"{varying} would be quoted: the placeholders would not match"
    script = slurm.job_script(str(root), AGENT, spec, job_ids)
    return script.replace(str(root), "<ROOT>").replace(sys.executable, "<PYTHON>")


@pytest.mark.parametrize("name", sorted(JOBS))
def test_the_batch_script_matches_its_golden_file(name: str, tmp_path: Path) -> None:
    spec, job_ids = JOBS[name]
    script = render(tmp_path / "root", spec, job_ids)
    golden = GOLDEN / f"sbatch_{name}.txt"
    if os.environ.get("REMOTE_MAGIC_UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(exist_ok=True)
        golden.write_bytes(script.encode())
    assert golden.exists(), f"no {golden.name}: run with REMOTE_MAGIC_UPDATE_GOLDEN=1 to write it"
    # Equal text is equal bytes (UTF-8); compared as text for pytest's line diff.
    assert script == golden.read_bytes().decode(), (
        f"the script differs from {golden.name}; if intended, rerun with REMOTE_MAGIC_UPDATE_GOLDEN=1"
    )


@pytest.mark.parametrize("name", sorted(JOBS))
def test_an_earlier_clients_spec_renders_the_same_script(name: str, tmp_path: Path) -> None:
    spec, job_ids = JOBS[name]
    root = tmp_path / "root"
    assert render(root, earlier_client(spec), job_ids) == render(root, spec, job_ids)

"""Values that reach a shell command or Slurm's batch script stay on one line (issue 18).

A line break in ``--name`` or ``--partition`` used to add lines to the sbatch script, and sbatch then
dropped the ``#SBATCH --requeue`` and ``--signal`` lines after them without a word. The magics refuse such
values before anything is sent; the agent refuses to render them (its own check). No cluster is needed: the
script is rendered by calling the agent's function, and the magics refuse before they connect.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import PYTHON, run
from IPython.core.error import UsageError

from remote_magic.agent import jobs, protocol
from remote_magic.agent.launch import slurm

BAD = "a\nb"
JOB = "20261127-103000-1a2b3c"


def _spec(**slurm_options: object) -> dict:
    return {"job_id": JOB, "name": "fit", "source": "", "slurm": {"gpus": 0, **slurm_options}}


@pytest.fixture
def root(tmp_path: Path) -> str:
    """A host root with the job's folder, where the script would be written."""
    (tmp_path / "jobs" / JOB).mkdir(parents=True)
    return str(tmp_path)


def test_the_rendered_script_keeps_every_directive_of_a_plain_job(root: str) -> None:
    script = slurm.job_script(root, "0" * 12, _spec(partition="gpu", time="1:00:00"), [JOB])
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert directives[0] == "#SBATCH --job-name=rm-fit"
    assert "#SBATCH --requeue" in directives and any(d.startswith("#SBATCH --signal=B:USR2@") for d in directives)
    assert "#SBATCH --partition=gpu" in directives and "#SBATCH --time=1:00:00" in directives


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ({**_spec(), "name": BAD}, "the job's name (--name)"),
        (_spec(partition=BAD), "--partition"),
        (_spec(time="1:00:00\r"), "--time"),
        (_spec(account="lab\x1b42"), "--account"),
        (_spec(setup=["module load cuda", "echo\nexit 0"]), "the host setting 'setup' line"),
    ],
)
def test_the_agent_refuses_to_render_a_script_with_a_line_break(root: str, spec: dict, named: str) -> None:
    with pytest.raises(slurm.SlurmError) as refused:
        slurm.job_script(root, "0" * 12, spec, [JOB])
    message = str(refused.value)
    assert message.startswith(named) and "give it on one line" in message, message


def test_the_agent_refuses_sbatch_arguments_with_a_line_break() -> None:
    assert slurm.sbatch_argv(_spec(extra_args=["--mem=8G"]), "s.sh") == ["sbatch", "--parsable", "--mem=8G", "s.sh"]
    with pytest.raises(slurm.SlurmError, match="sbatch argument"):
        slurm.sbatch_argv(_spec(sbatch_args=["--mem=8G\n#SBATCH --x"]), "s.sh")


def test_a_job_refused_at_rendering_ends_with_the_reason_and_no_script(tmp_path: Path) -> None:
    """The launcher writes nothing for sbatch and ends the job with the refusal, so it never waits for ever."""
    root = str(tmp_path)
    path, spec = jobs.create_job(root, {"source": "y = 1", "name": BAD, "slurm": {"gpus": 0}}, b"")
    with pytest.raises(slurm.SlurmError, match="line break"):
        slurm.SlurmLauncher().start(root, "0" * 12, path, spec)
    assert not os.path.exists(os.path.join(path, slurm.SCRIPT_FILE))
    last = jobs.last_event(path)
    assert last is not None and last["type"] == protocol.ERROR and "line break" in last["message"]


# ------------------------------------------------------------------ the magics
def _job_count(root: Path) -> int:
    return len(os.listdir(root / "jobs")) if (root / "jobs").exists() else 0


def _refused(ip, sshd, line: str) -> str:  # type: ignore[no-untyped-def]
    """The UsageError of ``%%remote_train LINE``; asserts that nothing reached the host."""
    jobs_before, logins = _job_count(sshd.host_root), sshd.accepted_logins()
    result = run(ip, f"%%remote_train {line}\ny = 1\n")
    assert isinstance(result.error_in_exec, UsageError), result.error_in_exec
    assert _job_count(sshd.host_root) == jobs_before and sshd.accepted_logins() == logins
    assert "y" not in ip.user_ns
    return str(result.error_in_exec)


@pytest.fixture
def slurm_host(ip):  # type: ignore[no-untyped-def]
    """testhost set up as a Slurm login node (nothing reaches it in these tests)."""
    magics = ip.magics_manager.registry["RemoteMagics"]
    magics.hosts = {"testhost": {"python": PYTHON, "scheduler": "slurm"}}
    return magics


def test_a_name_with_a_line_break_is_refused_before_anything_is_sent(ip, sshd) -> None:
    ip.user_ns["bad"] = BAD
    message = _refused(ip, sshd, '--host testhost --name "{bad}"')  # IPython expands {bad} into the line
    assert message.startswith("--name 'a\\nb' has a line break in it") and "one line" in message, message
    assert "nothing was sent" in message


@pytest.mark.parametrize(
    ("option", "value"),
    [("--partition", BAD), ("--time", "2:00:00\n#SBATCH --x"), ("--slurm", "--mem=8G\r"), ("--python", "py\x00")],
)
def test_slurm_options_with_a_control_character_are_refused(ip, sshd, slurm_host, option: str, value: str) -> None:
    ip.user_ns["bad"] = value
    message = _refused(ip, sshd, f'--host testhost {option} "{{bad}}"')
    assert message.startswith(f"{option} {value!r} has "), message


def test_a_host_setting_with_a_line_break_is_refused_before_anything_is_sent(ip, sshd, slurm_host) -> None:
    slurm_host.hosts = {"testhost": {"python": PYTHON, "scheduler": "slurm", "setup": ["module load x\nexit 0"]}}
    message = _refused(ip, sshd, "--host testhost")
    assert message.startswith("c.RemoteMagics.hosts['testhost']['setup'] 'module load x\\nexit 0' has a line break")
    assert "list of strings" in message


def test_other_magics_refuse_a_line_break_too(ip) -> None:
    ip.user_ns["bad"] = "7d\n"
    with pytest.raises(UsageError, match=r"^--older-than '7d\\n' has a line break"):
        ip.run_line_magic("remote_gc", '--host testhost --older-than "{bad}"')

"""session/request.py alone: a cell's job options against a host as its settings and its hello describe it.

No host and no sshd: the host is what ``hello`` would say (its GPUs, its launcher) and its settings as typed
in ``c.RemoteMagics.hosts``.  Each test asserts what the user would see: the request that travels in the
job's spec, the note on the panel, or the message of the mistake.
"""

from __future__ import annotations

from typing import Any

import pytest

from remote_magic.agent.protocol import PROCESS_LAUNCHER as PROCESS
from remote_magic.agent.protocol import SLURM_LAUNCHER as SLURM
from remote_magic.agent.protocol import GpuRequest
from remote_magic.session.hosts import HostSettings, SlurmSettings, read_host_settings
from remote_magic.session.request import (
    HostFacts,
    JobOptions,
    JobRequest,
    RequestError,
    host_launcher,
    job_request,
)

PLAIN = HostSettings()
SLURM_HOST = read_host_settings("cluster", {"scheduler": "slurm", "partition": "gpu", "gpus": 2, "time": "1:00:00"})


def _hello(gpus: int, launcher: str | None = None) -> dict[str, Any]:
    """What an agent says at hello: the GPUs its nvidia-smi lists, and (newer agents) its launcher."""
    hello: dict[str, Any] = {"gpus": [{"index": i, "name": "H100"} for i in range(gpus)]}
    if launcher is not None:
        hello["launcher"] = launcher
    return hello


def _plain(gpus: int) -> HostFacts:
    return HostFacts.from_hello("gpu1", PLAIN, _hello(gpus, PROCESS))


def _slurm() -> HostFacts:
    return HostFacts.from_hello("cluster", SLURM_HOST, _hello(0, SLURM))


def _request(host: HostFacts, trials: int | None = None, **options: Any) -> JobRequest:
    return job_request(JobOptions(**options), host, trials)


def _refusal(host: HostFacts, **options: Any) -> str:
    with pytest.raises(RequestError) as refused:
        _request(host, **options)
    return str(refused.value)


# ---------------------------------------------------------------- a plain host with N GPUs
@pytest.mark.parametrize(("gpus", "expected"), [(0, GpuRequest(0)), (1, GpuRequest(1)), (4, GpuRequest(1))])
def test_by_default_a_job_holds_one_gpu_where_the_host_has_any(gpus: int, expected: GpuRequest) -> None:
    assert _request(_plain(gpus)).gpus == expected


def test_the_default_says_it_uses_one_of_several_gpus() -> None:
    assert _request(_plain(4)).notes == ("using 1 of 4 GPUs; --gpus all for all",)
    assert _request(_plain(1)).notes == ()  # the only GPU: nothing to say
    assert _request(_plain(0)).notes == ()
    assert _request(_plain(4), gpus="1").notes == ()  # asked for: nothing to say
    assert _request(_plain(4), gpu_ids="2").notes == ()
    assert _request(_plain(4), trials=3).notes == ()  # a sweep's trials share the GPUs by design


def test_gpus_all_and_a_count_and_ids() -> None:
    assert _request(_plain(4), gpus="all").gpus == GpuRequest(GpuRequest.ALL)
    assert _request(_plain(4), gpus="'ALL'").gpus == GpuRequest(GpuRequest.ALL)  # quotes and case tolerated
    assert _request(_plain(4), gpus="2").gpus == GpuRequest(2)
    assert _request(_plain(4), gpus="0").gpus == GpuRequest(0)
    assert _request(_plain(0), gpus="0").gpus == GpuRequest(0)  # none asked of a host with none
    assert _request(_plain(4), gpu_ids="3, 1").gpus == GpuRequest(ids=(1, 3))  # sorted


def test_the_queue_settings_travel_only_where_there_are_gpus_to_queue_for() -> None:
    settings = read_host_settings("gpu1", {"busy_gpu_memory": "2GiB", "queue": "/srv/queue"})
    with_gpus = _request(HostFacts.from_hello("gpu1", settings, _hello(2)))
    assert (with_gpus.busy_gpu_memory, with_gpus.queue, with_gpus.slurm) == (2048, "/srv/queue", None)
    without = _request(HostFacts.from_hello("gpu1", settings, _hello(0)))
    assert (without.busy_gpu_memory, without.queue) == (None, "/srv/queue")


@pytest.mark.parametrize(
    ("gpus", "options", "message"),
    [
        (4, {"gpus": "two"}, "--gpus takes a number of GPUs (0 for none) or 'all', not 'two'"),
        (4, {"gpus": "-1"}, "--gpus takes a number of GPUs (0 for none) or 'all', not '-1'"),
        (4, {"gpus": "5"}, "--gpus 5: host gpu1 has 4 GPUs"),
        (0, {"gpus": "1"}, "--gpus 1: host gpu1 has no GPUs (nvidia-smi finds none there)"),
        (
            0,
            {"gpus": "all"},
            "--gpus all: host gpu1 has no GPUs (nvidia-smi finds none there); leave it out to run on the CPU",
        ),
        (4, {"gpu_ids": "a,b"}, "--gpu-ids takes GPU numbers such as 2,3, not 'a,b'"),
        (
            0,
            {"gpu_ids": "0"},
            "--gpu-ids 0: host gpu1 has no GPUs (nvidia-smi finds none there); leave it out to run on the CPU",
        ),
        (4, {"gpu_ids": "4"}, "--gpu-ids 4: host gpu1 has GPUs 0 to 3, each once"),
        (4, {"gpu_ids": "-1"}, "--gpu-ids -1: host gpu1 has GPUs 0 to 3, each once"),
        (4, {"gpu_ids": "1,1"}, "--gpu-ids 1,1: host gpu1 has GPUs 0 to 3, each once"),
        (4, {"gpu_ids": ","}, "--gpu-ids ,: host gpu1 has GPUs 0 to 3, each once"),
    ],
)
def test_what_a_plain_host_refuses(gpus: int, options: dict[str, str], message: str) -> None:
    assert _refusal(_plain(gpus), **options) == message


def test_a_count_and_ids_do_not_go_together() -> None:
    with pytest.raises(RequestError) as refused:
        JobOptions(gpus="1", gpu_ids="0")
    assert str(refused.value) == "--gpus and --gpu-ids do not go together: give a count, or the GPUs themselves"


@pytest.mark.parametrize("option", ["time", "partition", "slurm", "tasks", "nodes"])
def test_slurm_options_on_a_plain_host_say_how_to_make_it_a_slurm_host(option: str) -> None:
    value = 2 if option in ("tasks", "nodes") else "x"
    assert _refusal(_plain(1), **{option: value}) == (
        f"--{option}: host gpu1 is not a Slurm host; set 'scheduler': 'slurm' in its c.RemoteMagics.hosts entry "
        "if jobs there go through Slurm"
    )
    assert _refusal(_plain(1), time="1:00", partition="p").startswith("--time, --partition: host gpu1 is not")


# ---------------------------------------------------------------- a Slurm host
def test_a_slurm_job_asks_for_the_host_setting_by_default_and_a_count_when_given() -> None:
    assert _request(_slurm()).gpus == GpuRequest(2)
    assert _request(_slurm()).notes == ()
    assert _request(_slurm(), gpus="4").gpus == GpuRequest(4)
    assert _request(_slurm(), gpus="0").gpus == GpuRequest(0)


def test_a_slurm_job_carries_the_host_settings_with_the_cell_options_on_top_and_no_gpus() -> None:
    job = _request(_slurm(), time="2:00:00", slurm="--mem=8G --constraint='a100 80gb'", tasks=2, nodes=1)
    assert job.slurm == {
        "partition": "gpu",
        "account": None,
        "qos": None,
        "time": "2:00:00",
        "sbatch_args": [],
        "setup": [],
        "signal_grace": 120,
        "extra_args": ["--mem=8G", "--constraint=a100 80gb"],
        "tasks": 2,
        "nodes": 1,
    }
    settings_only = {key: value for key, value in job.slurm.items() if key not in ("extra_args", "tasks", "nodes")}
    assert _request(_slurm()).slurm == {**settings_only, "time": "1:00:00"}  # options not given add nothing
    assert SlurmSettings(partition="p", gpus=3).job_options({"partition": None, "time": "5"})["partition"] == "p"
    assert "gpus" not in SlurmSettings(gpus=3).job_options({})  # the GPUs travel in the spec's ``gpus``


def test_a_slurm_request_turns_off_warm_runners() -> None:
    class Submission:
        gpus, slurm, warm, busy_gpu_memory, queue = GpuRequest(), None, True, None, None

    submission = Submission()
    _request(_slurm(), gpus="1").apply(submission)  # type: ignore[arg-type]
    assert (submission.gpus, submission.warm, submission.slurm is not None) == (GpuRequest(1), False, True)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"gpu_ids": "0,1"},
            "--gpu-ids: on Slurm host cluster, Slurm picks the GPUs; ask for a number with --gpus N",
        ),
        (
            {"gpus": "all"},
            "--gpus all: on Slurm host cluster, Slurm picks the GPUs; --gpus takes a number per job (0 for none)",
        ),
        (
            {"gpus": "two"},
            "--gpus two: on Slurm host cluster, Slurm picks the GPUs; --gpus takes a number per job (0 for none)",
        ),
        ({"tasks": 0}, "--tasks takes a number, 1 or more, not 0"),
        ({"nodes": -1}, "--nodes takes a number, 1 or more, not -1"),
        ({"slurm": "--comment='open"}, '--slurm "--comment=\'open": No closing quotation'),
    ],
)
def test_what_a_slurm_host_refuses(options: dict[str, Any], message: str) -> None:
    assert _refusal(_slurm(), **options) == message


# ---------------------------------------------------------------- sweeps: trials at once
@pytest.mark.parametrize(
    ("host", "options", "trials", "parallel"),
    [
        (_plain(4), {}, 10, 4),  # one GPU each: as many as the host has
        (_plain(4), {"gpus": "2"}, 10, 2),
        (_plain(4), {"gpus": "3"}, 10, 1),
        (_plain(4), {"gpus": "all"}, 10, 1),
        (_plain(4), {"gpu_ids": "0,1"}, 10, 1),  # the same GPUs for each: one at a time
        (_plain(4), {"gpus": "0"}, 10, 1),
        (_plain(0), {}, 10, 1),  # no GPUs to share
        (_plain(4), {"parallel": 3}, 10, 3),  # as asked
        (_slurm(), {}, 10, 10),  # Slurm's scheduler spreads them
        (_slurm(), {"parallel": 2}, 10, 2),
    ],
)
def test_a_sweeps_trials_at_once(host: HostFacts, options: dict[str, Any], trials: int, parallel: int) -> None:
    assert _request(host, trials=trials, **options).parallel == parallel


def test_one_job_has_no_parallelism() -> None:
    assert _request(_plain(4)).parallel is None


# ---------------------------------------------------------------- the launcher: as the host says at hello
def test_the_launcher_is_what_the_agent_reports_at_hello_else_what_the_settings_say() -> None:
    assert host_launcher(PLAIN, _hello(2, SLURM)) == SLURM  # the host knows better than the settings
    assert host_launcher(SLURM_HOST, _hello(0, PROCESS)) == PROCESS
    assert host_launcher(SLURM_HOST, _hello(0)) == SLURM  # an older agent says nothing: the settings decide
    assert host_launcher(PLAIN, _hello(0)) == PROCESS
    assert host_launcher(SLURM_HOST, None) == SLURM
    assert host_launcher(PLAIN, {"launcher": "kubernetes"}) == PROCESS  # one it does not know: the settings


def test_a_host_that_reports_slurm_is_one_even_without_the_setting() -> None:
    host = HostFacts.from_hello("login", PLAIN, _hello(8, SLURM))
    assert host.gpus == 0  # a login node's GPUs are not the jobs'
    assert host.slurm == SlurmSettings()  # Slurm's own defaults
    assert _request(host).gpus == GpuRequest(0) and _request(host).slurm is not None
    assert _refusal(host, gpus="all").startswith("--gpus all: on Slurm host login, Slurm picks the GPUs")


def test_a_host_set_as_slurm_whose_agent_runs_processes_counts_its_gpus() -> None:
    host = HostFacts.from_hello("cluster", SLURM_HOST, _hello(2, PROCESS))
    assert (host.gpus, host.slurm) == (2, None)
    assert _request(host).gpus == GpuRequest(1) and _request(host).slurm is None
    assert _refusal(host, time="1:00").startswith("--time: host cluster is not a Slurm host")

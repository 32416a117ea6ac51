"""Sweeps: one cell run once per set of parameters, each trial an ordinary job, ranked by one metric.

``trials`` (the grid, ``Trial``, ``Sweep``: what the user gets back), ``run``
(submitting and following the trials), ``find`` (a sweep submitted earlier,
by its id); this face hands on the names the magics, the panels and the tests use.
"""

from .find import FoundSweep, FoundTrial, find_sweep
from .run import CANCEL_WAIT_SECONDS, Action, Pick, SweepPanel, SweepRun, submit_trials
from .trials import (
    MODES,
    Sweep,
    SweepError,
    Trial,
    default_metric,
    default_mode,
    describe_params,
    expand_grid,
    json_params,
    new_sweep,
    new_sweep_id,
)

__all__ = [
    "CANCEL_WAIT_SECONDS", "MODES", "Action", "FoundSweep", "FoundTrial", "Pick", "Sweep", "SweepError",
    "SweepPanel", "SweepRun", "Trial", "default_metric", "default_mode", "describe_params", "expand_grid",
    "find_sweep", "json_params", "new_sweep", "new_sweep_id", "submit_trials",
]  # fmt: skip

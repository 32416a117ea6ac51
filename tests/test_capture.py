"""Which names a cell reads and writes: the rules README documents."""

from __future__ import annotations

import pytest

from remote_magic.project.capture import CaptureError, analyze, default_outputs, select_inputs


def test_reads_before_assignment_are_inputs_and_assignments_are_outputs() -> None:
    names = analyze("x = x + 1\ny = scale * x\nfor i in range(n):\n    total = i\n")
    assert names.reads == ["x", "scale", "range", "n"]
    assert names.assigned == ["x", "y", "i", "total"]


def test_only_assigned_names_are_outputs_by_syntax_changed_inputs_are_left_to_the_host() -> None:
    source = "history = model.fit(x, y)\ncfg['lr'] = 0.1\nlog.append(1)\nz = arr.reshape(-1)\n_ = 1\ndel old\n"
    names = analyze(source)
    assert select_inputs(names, {n: 0 for n in ["model", "x", "y", "cfg", "log", "arr"]}) == [
        "model",
        "x",
        "y",
        "cfg",
        "log",
        "arr",
    ]
    assert default_outputs(names) == ["history", "z", "old"]  # "_" is left out; cfg and log: by content


def test_names_inside_functions_are_lazy_and_never_undefined_errors() -> None:
    names = analyze("def loss(a, b):\n    return weight * (a - b) + later\nlater = 1\n")
    assert set(names.lazy_reads) == {"weight", "later"}
    assert select_inputs(names, {"weight": 2.0}) == ["weight"]


def test_comprehension_variables_stay_in_their_scope() -> None:
    names = analyze("squares = [v * v for v in values]\n")
    assert names.reads == ["values"] and names.assigned == ["squares"]


def test_undefined_name_is_an_error_naming_it() -> None:
    with pytest.raises(CaptureError, match="name 'x_tran' is not defined"):
        select_inputs(analyze("model.fit(x_tran)"), {"model": object()})


def test_builtins_and_hidden_names_are_not_inputs() -> None:
    names = analyze("print(len(data), In)")
    assert select_inputs(names, {"data": [], "In": []}, hidden={"In"}) == ["data"]


def test_syntax_error_names_the_line() -> None:
    with pytest.raises(CaptureError, match="cell line 2"):
        analyze("x = 1\ny = (\n")

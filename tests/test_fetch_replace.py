"""A re-run's ``--fetch`` replaces the file our own earlier fetch wrote, and never the user's.

keras.io's timeseries tutorial saves ``best_model.keras`` with ``ModelCheckpoint`` and loads it in the
next cell: a re-run must leave the new model there, not beside it.  A file the user wrote or edited is
kept (the job's saved beside it), and so is every file while the record of our fetches is damaged.
Real jobs on the embedded local host, in a throw-away working folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import run

from remote_magic.paths import data_dir

TIMESERIES_CELL = """%%remote_train --host local --fetch best_model.keras
import numpy as np
import keras

keras.utils.set_random_seed(seed)
rng = np.random.default_rng(seed)
x = rng.normal(size=(48, 16, 1)).astype("float32")
y = (x.mean(axis=(1, 2)) > 0).astype("int32")
model = keras.Sequential([
    keras.Input((16, 1)),
    keras.layers.Conv1D(4, 3, activation="relu"),
    keras.layers.GlobalAveragePooling1D(),
    keras.layers.Dense(2, activation="softmax"),
])
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
checkpoint = keras.callbacks.ModelCheckpoint("best_model.keras", save_best_only=True, monitor="val_loss")
model.fit(x, y, epochs=2, batch_size=16, validation_split=0.25, verbose=0, callbacks=[checkpoint])
best_weights = keras.models.load_model("best_model.keras").get_weights()
best_digest = __import__("hashlib").sha256(open("best_model.keras", "rb").read()).hexdigest()
del checkpoint
"""


@pytest.fixture
def folder(ip, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:  # type: ignore[no-untyped-def]
    """The kernel's working folder: a fresh one, as a notebook's."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _last_job(ip) -> str:  # type: ignore[no-untyped-def]
    return ip.magics_manager.registry["RemoteMagics"].registry.records()[-1].job_id


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_rerun_replaces_best_model_keras_and_the_next_cell_loads_the_new_model(ip, folder: Path, capsys) -> None:
    assert run(ip, "import keras").success  # the tutorial's import, for its next cell here
    runs = []
    for seed in (1, 2):
        assert run(ip, f"seed = {seed}").success
        result = run(ip, TIMESERIES_CELL)
        assert result.success, result.error_in_exec
        shown = capsys.readouterr().out
        assert run(ip, 'model = keras.models.load_model("best_model.keras")').success  # the tutorial's next cell
        loaded = ip.user_ns["model"].get_weights()
        for here, there in zip(loaded, ip.user_ns["best_weights"], strict=True):
            np.testing.assert_array_equal(here, there)  # the model of THIS run
        assert _sha256(folder / "best_model.keras") == ip.user_ns["best_digest"]
        runs.append((shown, loaded))

    first, second = runs
    assert "fetched: best_model.keras (" in first[0] and "replaced" not in first[0]
    assert "best_model.keras (replaced our earlier fetch, " in second[0]
    assert "exists here with other content" not in second[0]
    assert not all(np.array_equal(a, b) for a, b in zip(first[1], second[1], strict=True))  # the runs differ
    assert sorted(p.name for p in folder.iterdir()) == ["best_model.keras"]  # no best_model.<job>.keras
    record = Path(data_dir()) / "fetched.json"  # our record is ours: in the data dir, private
    assert record.stat().st_mode & 0o777 == 0o600
    assert os.path.realpath(folder / "best_model.keras") in json.loads(record.read_text())["files"]


WRITER_CELL = """%%remote_train --host local --fetch notes.txt,mine.txt,touched.txt
for name in ("notes.txt", "mine.txt", "touched.txt"):
    open(name, "w").write(f"{name} from run {n}\\n")
"""


def test_a_file_the_user_wrote_or_edited_is_kept_and_the_jobs_saved_beside_it(ip, folder: Path, capsys) -> None:
    (folder / "mine.txt").write_text("the user's own, before any fetch\n")
    assert run(ip, "n = 1").success
    assert run(ip, WRITER_CELL).success
    first_job, shown = _last_job(ip), capsys.readouterr().out
    assert (folder / "mine.txt").read_text() == "the user's own, before any fetch\n"
    assert (folder / f"mine.{first_job}.txt").read_text() == "mine.txt from run 1\n"
    assert f"mine.txt exists here with other content: kept it, saved the job's as mine.{first_job}.txt" in shown

    # Edited after our fetch: the same size and its mtime set back, so only the content tells.
    notes = folder / "notes.txt"
    before = notes.stat()
    notes.write_text(notes.read_text().replace("run 1", "run X"))
    os.utime(notes, ns=(before.st_atime_ns, before.st_mtime_ns))
    # Only touched (its content unchanged): still the file our fetch wrote.
    os.utime(folder / "touched.txt", ns=(1_000_000_000, 1_000_000_000))

    assert run(ip, "n = 2").success
    assert run(ip, WRITER_CELL).success
    job, shown = _last_job(ip), capsys.readouterr().out
    assert notes.read_text() == "notes.txt from run X\n"  # kept
    assert (folder / f"notes.{job}.txt").read_text() == "notes.txt from run 2\n"
    assert f"notes.txt exists here with other content: kept it, saved the job's as notes.{job}.txt" in shown
    assert "(--fetch-overwrite replaces it)" in shown
    assert (folder / "mine.txt").read_text() == "the user's own, before any fetch\n"  # still the user's
    assert (folder / f"mine.{job}.txt").read_text() == "mine.txt from run 2\n"
    assert (folder / "touched.txt").read_text() == "touched.txt from run 2\n"
    assert "touched.txt (replaced our earlier fetch, 23 bytes)" in shown
    assert not (folder / f"touched.{job}.txt").exists()

    # --fetch-overwrite still replaces the user's file; the file it wrote is then ours to replace.
    assert run(ip, f"%remote_fetch {first_job} notes.txt --overwrite").success
    assert notes.read_text() == "notes.txt from run 1\n"
    assert run(ip, f"%remote_fetch {job} notes.txt").success
    assert notes.read_text() == "notes.txt from run 2\n"
    assert "notes.txt (replaced our earlier fetch, 21 bytes)" in capsys.readouterr().out


def _bad_entry(record: Path) -> None:
    data = json.loads(record.read_text())
    for entry in data["files"].values():
        entry.update(size=str(entry["size"]), written="yesterday")  # unchecked, its sort would fail
    record.write_text(json.dumps(data))


CORRUPTIONS = {
    "not json": lambda record: record.write_bytes(b'{"version": 1, "files": {'),
    "not utf-8": lambda record: record.write_bytes(b"\xff\xfe\x00garbage"),
    "a list": lambda record: record.write_text("[]"),
    "a bad entry": _bad_entry,
    "a folder": lambda record: (record.unlink(), record.mkdir()),
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS))
def test_a_damaged_record_keeps_every_file_as_the_users(ip, folder: Path, capsys, corrupt: str) -> None:
    record = Path(data_dir()) / "fetched.json"
    cell = '%%remote_train --host local\nopen("notes.txt", "w").write(f"run {n}")\n'
    jobs = []
    for n in (1, 2):
        assert run(ip, f"n = {n}").success
        assert run(ip, cell).success
        jobs.append(_last_job(ip))
    notes = folder / "notes.txt"

    assert run(ip, f"%remote_fetch {jobs[0]} notes.txt").success
    assert run(ip, f"%remote_fetch {jobs[1]} notes.txt").success  # the record intact: replaced
    assert notes.read_text() == "run 2" and "replaced our earlier fetch" in capsys.readouterr().out

    notes.unlink()
    assert run(ip, f"%remote_fetch {jobs[0]} notes.txt").success
    CORRUPTIONS[corrupt](record)
    result = run(ip, f"%remote_fetch {jobs[1]} notes.txt")
    shown = capsys.readouterr().out
    assert result.success, result.error_in_exec
    assert notes.read_text() == "run 1"  # kept: without the record it counts as the user's
    assert (folder / f"notes.{jobs[1]}.txt").read_text() == "run 2"
    assert "notes.txt exists here with other content: kept it" in shown
    if record.is_dir():
        record.rmdir()  # the next test's fetches may record again

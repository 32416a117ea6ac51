"""A notebook in a project: local modules, data files, files written back, over the real sshd.

The project is what a user has: a package with relative imports, a helper
module next to the notebook, a data folder with a CSV and ~50 MB of .npy; the
kernel runs in ``notebooks/`` and the cells use relative paths unchanged.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run

MiB = 1024 * 1024
SMALL = 64 * 1024  # a spec, a small pickle and the framing: what a re-run may send

PACKAGE = {
    "shapes/__init__.py": "from .models import build_model\n",
    "shapes/models.py": (
        "import keras\n"
        "from .layers import Scale\n\n\n"
        "def build_model(width):\n"
        "    model = keras.Sequential([keras.Input((width,)), Scale(), keras.layers.Dense(1)])\n"
        "    model.compile(optimizer='adam', loss='mse')\n"
        "    return model\n"
    ),
    "shapes/layers.py": (
        "import keras\n\n\n"
        "@keras.saving.register_keras_serializable(package='shapes')\n"
        "class Scale(keras.layers.Layer):\n"
        "    def call(self, x):\n"
        "        return 0.5 * x\n"
    ),
}
HELPERS = "import numpy as np\n\n\ndef normalize(x):\n    return (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)\n"

TRAIN_CELL = """%%remote_train --host testhost --files ../data
import numpy as np
from shapes import build_model

table = np.loadtxt("../data/train.csv", delimiter=",", skiprows=1, dtype="float32")
x, y = normalize(table[:, :4]), table[:, 4]
model = build_model(4)
model.fit(x, y, epochs=2, verbose=0)
big_sum = float(np.load("../data/big.npy").sum())
part_sum = float(np.load("../data/extra/part.npy").sum())
"""


def write_project(root: Path) -> Path:
    """The package, the helper beside the notebooks folder, a CSV and ~51 MB of .npy (also used by bench/)."""
    for rel, text in {**PACKAGE, "notebooks/helpers.py": HELPERS}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    data = root / "data"
    (data / "extra").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = np.hstack([rng.random((64, 4)), rng.random((64, 1))]).astype("float32")
    np.savetxt(data / "train.csv", rows, delimiter=",", header="a,b,c,d,y", comments="", fmt="%.5f")
    np.save(data / "big.npy", rng.random(50 * MiB // 8))
    np.save(data / "extra" / "part.npy", rng.random(MiB // 8))
    return root


@pytest.fixture
def project(ip, tmp_path, monkeypatch) -> Path:
    """The project on disk, the kernel in its notebooks/ folder, as after `import helpers` in a first cell."""
    root = write_project(tmp_path / "proj")
    data = root / "data"
    (data / ".gitignore").write_text("scratch/\n")
    (data / "scratch").mkdir()
    (data / "scratch" / "huge.bin").write_bytes(b"x" * (4 * MiB))  # ignored: never sent
    monkeypatch.chdir(root / "notebooks")
    monkeypatch.syspath_prepend(str(root / "notebooks"))
    monkeypatch.syspath_prepend(str(root))  # as `sys.path.append("..")` or `pip install -e ..` would
    _forget_project_modules()  # another test's own `helpers` may still be imported
    yield root
    _forget_project_modules()


def _forget_project_modules() -> None:
    for name in [m for m in sys.modules if m.split(".")[0] in ("shapes", "helpers")]:
        del sys.modules[name]


def _client(ip):  # type: ignore[no-untyped-def]
    return ip.magics_manager.registry["RemoteMagics"]._client("testhost")


def _sent_by(ip, cell: str) -> int:  # type: ignore[no-untyped-def]
    client = _client(ip)
    before = client.bytes_sent
    result = run(ip, cell)
    assert result.success, result.error_in_exec
    return client.bytes_sent - before


def test_the_unchanged_project_code_trains_remotely_and_resends_only_what_changed(ip, project, capsys) -> None:
    assert run(ip, "from helpers import normalize").success
    first = _sent_by(ip, TRAIN_CELL)
    assert first > 50 * MiB  # the data went once
    model = ip.user_ns["model"]
    assert ip.user_ns["big_sum"] == pytest.approx(float(np.load(project / "data" / "big.npy").sum()))
    assert model.predict(np.ones((2, 4), "float32"), verbose=0).shape == (2, 1)
    assert type(model.layers[0]).__module__ == "shapes.layers"  # the package's own class, here and there
    shown = capsys.readouterr().out
    assert "scratch" not in shown
    assert "uploading:" in shown and "(100%)" in shown  # a large upload shows its progress

    assert _sent_by(ip, TRAIN_CELL) < SMALL  # nothing changed: no file or module bytes

    helpers = project / "notebooks" / "helpers.py"
    helpers.write_text(HELPERS + "\n# tuned\n")
    moved = _sent_by(ip, TRAIN_CELL)
    assert helpers.stat().st_size <= moved < SMALL  # the edited module only

    part = project / "data" / "extra" / "part.npy"
    np.save(part, np.random.default_rng(9).random(MiB // 8))
    moved = _sent_by(ip, TRAIN_CELL)
    assert part.stat().st_size <= moved < part.stat().st_size + SMALL  # that file only, not the 50 MB
    assert ip.user_ns["part_sum"] == pytest.approx(float(np.load(part).sum()))


def test_a_cell_that_overwrites_a_shipped_file_leaves_the_stored_copy_intact(ip, project, capsys) -> None:
    original = (project / "data" / "train.csv").read_text()
    clobber = "%%remote_train --host testhost --files ../data\nopen('../data/train.csv', 'w').write('garbage')\n"
    assert run(ip, clobber).success
    assert "files written: ../data/train.csv" in capsys.readouterr().out  # its own copy: what the job wrote
    assert (project / "data" / "train.csv").read_text() == original  # the local file is never touched
    read = "%%remote_train --host testhost --files ../data\ntext = open('../data/train.csv').read()\n"
    assert run(ip, read).success
    assert ip.user_ns["text"] == original


def test_fetch_brings_back_a_saved_model_that_loads_here_and_remote_fetch_does_it_later(ip, project, capsys) -> None:
    cell = (
        "%%remote_train --host testhost --fetch model.keras\n"
        "import os\n"
        "from shapes import build_model\n"
        "model = build_model(4)\n"
        "model.fit(np.ones((8, 4)), np.ones(8), epochs=1, verbose=0)\n"
        "model.save('model.keras')\n"
        "os.makedirs('logs', exist_ok=True)\n"
        "open('logs/run.txt', 'w').write('epoch 1 done')\n"
    )
    assert run(ip, "import numpy as np").success
    assert run(ip, cell).success
    shown = capsys.readouterr().out
    assert "files written:" in shown and "model.keras" in shown and "logs/run.txt" in shown
    import keras

    loaded = keras.saving.load_model(project / "notebooks" / "model.keras")
    np.testing.assert_allclose(
        loaded.predict(np.ones((1, 4)), verbose=0), ip.user_ns["model"].predict(np.ones((1, 4)), verbose=0)
    )
    job = ip.magics_manager.registry["RemoteMagics"].registry.records()[-1].job_id

    (project / "notebooks" / "logs").mkdir()
    (project / "notebooks" / "logs" / "run.txt").write_text("mine")
    assert run(ip, f"%remote_fetch {job} 'logs/*.txt'").success
    shown = capsys.readouterr().out
    assert (project / "notebooks" / "logs" / "run.txt").read_text() == "mine"  # kept
    assert (project / "notebooks" / "logs" / f"run.{job}.txt").read_text() == "epoch 1 done"
    assert "kept it" in shown
    assert run(ip, f"%remote_fetch {job} 'logs/*.txt' --overwrite").success
    assert (project / "notebooks" / "logs" / "run.txt").read_text() == "epoch 1 done"


def test_workdir_runs_in_a_folder_already_on_the_host_and_fetches_from_it(ip, tmp_path, monkeypatch) -> None:
    on_host = tmp_path / "host-data"
    on_host.mkdir()
    (on_host / "numbers.txt").write_text("1 2 3")
    monkeypatch.chdir(tmp_path)
    cell = (
        f"%%remote_train --host testhost --workdir {on_host} --fetch summary.txt\n"
        "total = sum(int(n) for n in open('numbers.txt').read().split())\n"
        "open('summary.txt', 'w').write(str(total))\n"
    )
    assert run(ip, cell).success
    assert ip.user_ns["total"] == 6
    assert (tmp_path / "summary.txt").read_text() == "6"


def test_a_local_module_that_was_not_sent_is_named_with_how_to_send_it(ip, project) -> None:
    magics = ip.magics_manager.registry["RemoteMagics"]
    magics.ship_modules = "none"
    try:
        result = run(ip, "%%remote_train --host testhost\nimport helpers\nvalue = helpers.normalize\n")
        message = str(result.error_in_exec)
        assert "helpers" in message and str(project / "notebooks" / "helpers.py") in message
        assert "--modules helpers" in message
        result = run(ip, "%%remote_train --host testhost --modules helpers\nimport helpers\nok = True\n")
        assert result.success and ip.user_ns["ok"] is True
    finally:
        magics.ship_modules = "auto"


def test_an_input_from_a_local_module_loads_on_the_host_without_importing_it_in_the_cell(ip, project) -> None:
    assert run(ip, "from helpers import normalize\nimport numpy as np\nx = np.arange(6.0).reshape(3, 2)").success
    assert run(ip, "%%remote_train --host testhost\nz = normalize(x)\n").success
    np.testing.assert_allclose(ip.user_ns["z"].mean(axis=0), 0, atol=1e-6)


@pytest.mark.parametrize(
    ("files", "named"),
    [
        ("../data/trian.csv", "../data/trian.csv"),
        ("../data/*.parquet", "*.parquet"),
        ("/", "/"),
    ],
)
def test_bad_file_paths_are_refused_before_anything_is_sent(ip, project, files, named) -> None:
    client = _client(ip)
    before = client.bytes_sent
    result = run(ip, f"%%remote_train --host testhost --files {files}\nx = 1\n")
    assert not result.success
    assert named in str(result.error_in_exec)
    assert client.bytes_sent == before


def test_image_dataset_from_a_folder_shipped_with_files(ip, tmp_path, monkeypatch) -> None:
    import tensorflow as tf

    for label in ("cats", "dogs"):
        folder = tmp_path / "images" / label
        folder.mkdir(parents=True)
        for i in range(3):
            pixels = tf.fill((8, 8, 3), 40 * i + (100 if label == "dogs" else 0))
            (folder / f"{i}.png").write_bytes(tf.io.encode_png(tf.cast(pixels, tf.uint8)).numpy())
    monkeypatch.chdir(tmp_path)
    cell = (
        "%%remote_train --host testhost --files images\n"
        "import keras\n"
        "ds = keras.utils.image_dataset_from_directory('images', image_size=(8, 8), batch_size=2)\n"
        "classes = ds.class_names\n"
        "count = sum(int(images.shape[0]) for images, _ in ds)\n"
    )
    assert run(ip, cell).success
    assert ip.user_ns["classes"] == ["cats", "dogs"] and ip.user_ns["count"] == 6


def test_job_files_on_the_host_are_private(ip, project, sshd) -> None:
    cell = (
        "%%remote_train --host testhost --files ../data/train.csv\n"
        "import os\n"
        "n = len(open('../data/train.csv').read())\n"
        "mode = os.stat('../data/train.csv').st_mode & 0o777\n"
    )
    assert run(ip, cell).success
    assert ip.user_ns["mode"] == 0o600  # the job's own copy, private
    job = max((sshd.host_root / "jobs").iterdir())
    assert not (job / "work" / "data" / "train.csv").exists()  # unchanged: removed when the job ended
    for folder, _, files in os.walk(job):
        assert os.stat(folder).st_mode & 0o077 == 0, folder
        for name in files:
            assert os.stat(os.path.join(folder, name)).st_mode & 0o077 == 0, name


def test_many_small_files_go_in_batches_not_one_round_trip_each(ip, tmp_path, monkeypatch) -> None:
    data = tmp_path / "many"
    for i in range(5000):
        folder = data / f"part{i // 500}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.txt").write_text(f"row {i}\n")
    monkeypatch.chdir(tmp_path)
    client = _client(ip)
    calls = {"put_blobs": 0, "put_blob": 0}
    for name in calls:
        real = getattr(client, name)

        def counted(*args, _real=real, _name=name, **kwargs):  # type: ignore[no-untyped-def]
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(client, name, counted)
    cell = "%%remote_train --host testhost --files many\nimport glob\ncount = len(glob.glob('many/*/*.txt'))\n"
    assert run(ip, cell).success
    assert ip.user_ns["count"] == 5000
    assert calls == {"put_blobs": 3, "put_blob": 0}  # 2000 files a request


@pytest.mark.parametrize(
    ("size", "change", "said"),
    [
        (MiB, "same size, other bytes", "part.npy changed while it was being sent"),
        (12 * MiB, "cut in half", "part.npy got shorter while it was being sent"),
    ],
)
def test_a_file_that_changes_while_being_sent_is_refused_naming_it(
    ip, project, monkeypatch, size, change, said
) -> None:
    """A small file (sent in a batch, caught by the host's hash check) and a large one (streamed as it is read)."""
    from remote_magic.wire import upload

    target = project / "data" / "extra" / "part.npy"
    target.write_bytes(os.urandom(size))  # content the host has never seen: it must be sent
    real = upload.send_missing

    def change_then_send(*args, **kwargs):  # type: ignore[no-untyped-def]
        data = bytearray(target.read_bytes())
        if change == "cut in half":
            del data[size // 2 :]
        else:
            data[-1] ^= 0xFF  # only the host's hash check can see this one
        target.write_bytes(bytes(data))
        return real(*args, **kwargs)

    monkeypatch.setattr(upload, "send_missing", change_then_send)
    result = run(ip, "%%remote_train --host testhost --files ../data/extra\nx = 1\n")
    assert not result.success
    message = str(result.error_in_exec)
    assert said in message and "nothing was run" in message
    monkeypatch.undo()
    assert run(ip, "%%remote_train --host testhost\ny = 2\n").success  # the connection is fine


def test_the_packages_a_job_needs_are_its_own_not_remote_magic(ip, project) -> None:
    """A Keras model pickles through our own rebuild function: the host need not have remote_magic installed."""
    from remote_magic import session

    assert run(ip, "import keras\nfrom shapes import build_model\nmodel = build_model(4)").success
    submission = session.prepare("import json\nmodel.fit(x)\n", {**ip.user_ns, "x": np.ones((2, 4))})
    needed = session.needed_imports(submission)
    assert {"cloudpickle", "numpy", "keras", "tensorflow"} <= set(needed)
    assert "remote_magic" not in needed and "shapes" not in needed and "json" not in needed
    assert [f.rel for f in submission.modules] == ["shapes/__init__.py", "shapes/layers.py", "shapes/models.py"]


def test_a_large_fetched_file_streams_to_disk_is_cached_and_can_climb_within_the_layout(ip, project) -> None:
    """20 MB written beside the notebook folder (`../models/`), as the layout mirrors the project."""
    cell = (
        "%%remote_train --host testhost --files ../data/train.csv --fetch ../models/weights.bin\n"
        "import os, hashlib\n"
        "os.makedirs('../models', exist_ok=True)\n"
        "blob = os.urandom(20 * 2**20)\n"
        "open('../models/weights.bin', 'wb').write(blob)\n"
        "digest = hashlib.sha256(blob).hexdigest()\n"
        "del blob\n"
    )
    assert run(ip, cell).success
    fetched = project / "models" / "weights.bin"
    import hashlib

    assert hashlib.sha256(fetched.read_bytes()).hexdigest() == ip.user_ns["digest"]
    assert not list((project / "models").glob("*.part-*"))

    fetched.unlink()
    client = _client(ip)
    received = client.bytes_received
    job = ip.magics_manager.registry["RemoteMagics"].registry.records()[-1].job_id
    assert run(ip, f"%remote_fetch {job} ../models/weights.bin").success
    assert hashlib.sha256(fetched.read_bytes()).hexdigest() == ip.user_ns["digest"]
    assert client.bytes_received - received < SMALL  # from the local cache, not the host

    result = run(ip, f"%remote_fetch {job} ../../../etc/passwd")
    assert not result.success and "outside the job's folder" in str(result.error_in_exec)

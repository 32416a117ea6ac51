"""The whole path in a real IPython shell: a Keras model trained by %%remote_train.

Run on the embedded local host and over a real sshd on 127.0.0.1.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MODEL_CELL, run


@pytest.mark.parametrize("host", ["local", "testhost"])
def test_fit_trains_the_model_and_brings_back_history(ip, host, capsys) -> None:
    assert run(ip, MODEL_CELL).success
    capsys.readouterr()
    result = run(
        ip, f"%%remote_train --host {host}\nhistory = model.fit(x_train, y_train, epochs=4, batch_size=32, verbose=0)\n"
    )
    assert result.success, result.error_in_exec
    out = capsys.readouterr().out

    model = ip.user_ns["model"]
    history = ip.user_ns["history"]
    changed = [not np.array_equal(a, b) for a, b in zip(model.get_weights(), ip.user_ns["weights_before"], strict=True)]
    assert all(changed), "every weight tensor should have been trained"
    assert int(model.optimizer.iterations.numpy()) == 4 * 8  # 256 samples / 32 per batch, 4 epochs
    assert len(history.history["loss"]) == 4
    assert history.model is model
    assert model.predict(ip.user_ns["x_train"][:3], verbose=0).shape == (3, 1)

    epoch_lines = [line for line in out.splitlines() if line.startswith("Epoch ")]
    assert [line.split(" - ")[0] for line in epoch_lines] == [f"Epoch {i}/4" for i in range(1, 5)]
    assert f"host {host}" in out and "injected: history (assigned); model (changed by the cell)" in out


def test_a_second_run_continues_training_from_the_returned_state(ip) -> None:
    assert run(ip, MODEL_CELL).success
    for _ in range(2):
        assert run(ip, "%%remote_train\nmodel.fit(x_train, y_train, epochs=1, batch_size=64, verbose=0)\n").success
    assert int(ip.user_ns["model"].optimizer.iterations.numpy()) == 2 * 4


CUSTOM_CELL = """
import numpy as np
import keras

class Doubling(keras.layers.Layer):
    def call(self, inputs):
        return inputs * 2.0

def squared_error(y_true, y_pred):
    return keras.ops.mean(keras.ops.square(y_true - y_pred[:, 0]))

x = np.linspace(0, 1, 64, dtype="float32").reshape(-1, 4)
y = x.sum(axis=1)
net = keras.Sequential([keras.Input((4,)), Doubling(), keras.layers.Dense(1)])
net.compile(optimizer="sgd", loss=squared_error)
"""


@pytest.mark.parametrize("host", ["local", "testhost"])
def test_custom_layer_and_loss_from_the_notebook_round_trip(ip, host) -> None:
    assert run(ip, CUSTOM_CELL).success
    result = run(ip, f"%%remote_train --host {host}\nnet.fit(x, y, epochs=2, verbose=0)\n")
    assert result.success, result.error_in_exec
    net = ip.user_ns["net"]
    assert type(net.layers[0]) is ip.user_ns["Doubling"]  # the notebook's own class, not a copy
    assert net.loss is ip.user_ns["squared_error"] or net.loss.__name__ == "squared_error"
    assert int(net.optimizer.iterations.numpy()) == 2 * 1
    prediction = net.predict(ip.user_ns["x"][:2], verbose=0)
    assert prediction.shape == (2, 1) and np.isfinite(prediction).all()


def test_plain_values_and_notebook_functions_travel(ip) -> None:
    assert run(
        ip, "def double(v):\n    return 2 * v\nitems = [1, 2]\nbig = __import__('numpy').ones(500_000)\n"
    ).success
    result = run(ip, "%%remote_train --host testhost\ntotal = double(big.sum())\nitems.append(3)\n")
    assert result.success, result.error_in_exec
    assert ip.user_ns["total"] == 1_000_000.0
    assert ip.user_ns["items"] == [1, 2, 3]

"""Figures 15-17: what deciding by content costs, and what it saves (issue 20).

Each figure runs the same cell two ways in the same run: with the default rule (the host tells by
content which inputs the cell changed) and with ``--out`` naming what comes back (no decision), so
the difference is what the decision costs a user; and the bytes a kernel receives with and without
its sent arrays being reused.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

MiB = 1024 * 1024


def _cell_time(bench: Any, source: str, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        bench.wait_for_warm_runner("testhost")  # as between two cells a user runs
        start = time.perf_counter()
        bench.quiet_cell(source)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def unchanged_inputs(bench: Any) -> None:
    """15: 1 GiB of inputs the cell only reads: known unchanged from their mappings, never hashed."""
    import hashlib

    import numpy as np

    size = (64 if bench.quick else 1024) * MiB
    chunks = [np.random.default_rng(15 + i).random(size // 8 // 8) for i in range(8)]
    bench.ip.user_ns["chunks"] = chunks
    bench.quiet_cell("%%remote_train --host testhost\nn = len(chunks)\n")  # uploads once
    deciding = _cell_time(bench, "%%remote_train --host testhost\nn = len(chunks)\n")
    named = _cell_time(bench, "%%remote_train --host testhost --out n\nn = len(chunks)\n")
    start = time.perf_counter()
    for chunk in chunks:
        hashlib.sha256(memoryview(chunk).cast("B")).digest()
    hashing = time.perf_counter() - start
    extra = deciding - named
    bench.record(15, f"deciding by content, {size // MiB} MiB unchanged inputs: cell time", deciding, named, "s",
                 "< 0.1 s over --out (hashing them would cost more)", extra < 0.1,
                 extra={"decision_s": extra, "hashing_inputs_s": hashing})  # fmt: skip
    del bench.ip.user_ns["chunks"]


def changed_model(bench: Any) -> None:
    """16: a 100 MB PyTorch model a notebook function changes: its new weights are hashed once."""
    bench.quiet_cell(
        "import torch\n"
        "torch.manual_seed(16)\n"
        f"wide = torch.nn.Linear({1250 if bench.quick else 5000}, 5000)\n"
        "def nudge(m):\n"
        "    with torch.no_grad():\n"
        "        m.weight.add_(1e-3)\n"
    )
    bench.quiet_cell("%%remote_train --host testhost\nnudge(wide)\n")  # uploads once
    deciding = _cell_time(bench, "%%remote_train --host testhost\nnudge(wide)\n")
    named = _cell_time(bench, "%%remote_train --host testhost --out wide\nnudge(wide)\n")
    megabytes = bench.ip.user_ns["wide"].weight.numel() * 4 / MiB
    extra = deciding - named
    bench.record(16, f"deciding by content, changed {megabytes:.0f} MiB model: cell time", deciding, named, "s",
                 "< 0.25 s over --out (one hash of the model)", extra < 0.25,
                 extra={"decision_s": extra})  # fmt: skip
    del bench.ip.user_ns["wide"]


def global_not_downloaded(bench: Any) -> None:
    """17: a model whose custom loss reads a 200 MB global: the bytes received back, with and without reuse."""
    from remote_magic.session import sent

    bench.quiet_cell(
        "import numpy as np, keras\n"
        f"TABLE = np.random.default_rng(17).random({3_125_000 if bench.quick else 25_000_000})\n"
        "def table_loss(y_true, y_pred):\n"
        "    return keras.ops.mean(keras.ops.square(y_true - y_pred)) + float(TABLE[0]) * 0.0\n"
        "tx = np.random.default_rng(18).random((64, 4), dtype=np.float32)\n"
        "ty = tx.sum(axis=1, keepdims=True)\n"
        "def table_model():\n"
        "    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])\n"
        "    m.compile(optimizer='sgd', loss=table_loss)\n"
        "    return m\n"
    )
    client = bench.transport()
    cell = "tmodel = table_model()\nget_ipython().run_cell_magic('remote_train', '--host testhost', 'tmodel.fit(tx, ty, epochs=1, verbose=0)')\n"

    def received() -> int:
        before = client.bytes_received
        bench.quiet_cell(cell)
        return client.bytes_received - before

    ours = received()
    remember, limit = sent.SENT.remember, bench.magics.cache_limit
    sent.SENT.forget()
    sent.SENT.remember, bench.magics.cache_limit = (lambda *args: None), 0  # as before: no reuse, no cache
    try:
        baseline = received()
    finally:
        sent.SENT.remember, bench.magics.cache_limit = remember, limit
    table = bench.ip.user_ns["TABLE"].nbytes
    bench.record(17, f"bytes received back, model reading a {table // MiB} MiB global", ours / MiB, baseline / MiB,
                 "MiB", "< 1% of the global", ours < table / 100)  # fmt: skip
    del bench.ip.user_ns["TABLE"]


FIGURES = [unchanged_inputs, changed_model, global_not_downloaded]

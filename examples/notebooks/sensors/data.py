"""Reading the sensor CSV (a relative path, the same here and on the host)."""

import numpy as np


def load_readings(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Features and the 0/1 label (last column) of a readings CSV with a header line."""
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype="float32")
    return table[:, :-1], table[:, -1]

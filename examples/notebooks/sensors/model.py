"""The model: relative imports inside the package work on the host too (the whole package travels)."""

import keras

from .layers import ClipOutliers


def build_model(features: int) -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((features,)),
            ClipOutliers(3.0),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy", metrics=["accuracy"])
    return model

"""A custom layer: registered, so a saved model file loads wherever this package is importable."""

import keras


@keras.saving.register_keras_serializable(package="sensors")
class ClipOutliers(keras.layers.Layer):
    """Sensor spikes beyond ``limit`` standard units would dominate training: cut them off."""

    def __init__(self, limit: float = 3.0, **kwargs):
        super().__init__(**kwargs)
        self.limit = limit

    def call(self, x):
        return keras.ops.clip(x, -self.limit, self.limit)

    def get_config(self):
        return {**super().get_config(), "limit": self.limit}

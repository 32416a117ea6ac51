"""Turns every Keras ``fit`` in a job into events.

Keras is imported only when the job uses it: ``watch_keras`` patches
``keras.Model.fit`` at once if keras is loaded, or right after the cell (or
an input being unpickled) first imports it.  The user's own callbacks and
``verbose`` keep working; ours is appended to theirs.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import inspect
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from . import protocol

EmitFn = Callable[..., Any]

# Batch progress events are throttled to this interval (seconds).
BATCH_INTERVAL = 0.5


class TrainingHooks:
    """What the runner gives every fit: where events go, the stop request, checkpointing."""

    def __init__(self, emit: EmitFn, checkpoint: Callable[[Any, int, int | None], None] | None = None) -> None:
        self.emit = emit
        self.checkpoint = checkpoint
        # Set by the runner's SIGINT handler: finish the current batch, then stop.
        self.stop_requested = threading.Event()


def watch_keras(hooks: TrainingHooks) -> None:
    if "keras" in sys.modules:
        _patch_fit(sys.modules["keras"], hooks)
        return
    sys.meta_path.insert(0, _PatchAfterImport("keras", lambda module: _patch_fit(module, hooks)))


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Runs ``hook(module)`` once, right after ``name`` has been imported."""

    def __init__(self, name: str, hook: Callable[[Any], None]) -> None:
        self.name = name
        self.hook = hook

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module
        hook = self.hook

        def exec_then_hook(module: Any) -> None:
            exec_module(module)
            hook(module)

        loader.exec_module = exec_then_hook  # type: ignore[method-assign]
        return spec


def _patch_fit(keras: Any, hooks: TrainingHooks) -> None:
    original_fit = keras.Model.fit
    if getattr(original_fit, "_remote_magic", False):
        return
    signature = inspect.signature(original_fit)
    event_callback_class = _event_callback_class(keras)

    def fit(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        callbacks = bound.arguments.get("callbacks")
        callbacks = [] if callbacks is None else list(callbacks)
        callbacks.append(event_callback_class(hooks))
        bound.arguments["callbacks"] = callbacks
        return original_fit(*bound.args, **bound.kwargs)

    fit._remote_magic = True  # type: ignore[attr-defined]
    fit.__doc__ = original_fit.__doc__
    keras.Model.fit = fit


def _event_callback_class(keras: Any) -> type:
    class EventCallback(keras.callbacks.Callback):
        """Reports training progress as events; honours a graceful stop request."""

        def __init__(self, hooks: TrainingHooks) -> None:
            super().__init__()
            self.hooks = hooks
            self.emit = hooks.emit
            self.epochs: int | None = None
            self.steps: int | None = None
            self.epoch = 0
            self.epoch_started = 0.0
            self.last_batch_event = 0.0

        def on_train_begin(self, logs: Any = None) -> None:
            self.epochs = self.params.get("epochs")
            self.steps = self.params.get("steps")
            self.emit(protocol.TRAIN_BEGIN, epochs=self.epochs, steps=self.steps)

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.epoch = epoch + 1
            self.epoch_started = time.time()

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if self.hooks.stop_requested.is_set():
                self.model.stop_training = True
            now = time.time()
            if now - self.last_batch_event >= BATCH_INTERVAL:
                self.last_batch_event = now
                self.emit(protocol.BATCH, epoch=self.epoch, batch=batch + 1, steps=self.steps, logs=floats(logs))

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if self.hooks.checkpoint is not None:
                self.hooks.checkpoint(self.model, epoch + 1, self.epochs)
            self.emit(
                protocol.EPOCH,
                epoch=epoch + 1,
                epochs=self.epochs,
                logs=floats(logs),
                seconds=round(time.time() - self.epoch_started, 3),
            )

        def on_train_end(self, logs: Any = None) -> None:
            stopped = self.hooks.stop_requested.is_set()
            self.emit(protocol.TRAIN_END, epoch=self.epoch, epochs=self.epochs, stopped=stopped)

    return EventCallback


def floats(logs: Any) -> dict[str, float]:
    result = {}
    for key, value in (logs or {}).items():
        try:
            result[key] = float(value)
        except (TypeError, ValueError):
            continue
    return result

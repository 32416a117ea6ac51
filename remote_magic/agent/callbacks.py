"""Turns every Keras ``fit`` in a job into events.

Keras is imported only when the job uses it: ``watch_keras`` patches
``keras.Model.fit`` at once if keras is loaded, or right after the cell (or
an input being unpickled) first imports it.  The user's own callbacks and
``verbose`` keep working; ours is appended to theirs.  What Keras's own
progress bar prints during a fit is marked (``in_keras_progress``), so the
panel, which shows those epochs already, can leave it out; the host's log
keeps it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import inspect
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import protocol

EmitFn = Callable[..., Any]

# Batch progress events are throttled to this interval (seconds).
BATCH_INTERVAL = 0.5


class Cancelled(BaseException):
    """Raised in the cell's thread when the job is cancelled (``%remote_cancel``: SIGTERM from its launcher)."""


class Requeue(BaseException):
    """The scheduler wants the job off its node (preemption, time limit): checkpointed, it ends and comes back.

    A BaseException, so neither the cell nor Keras swallows it.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Resume:
    """Where a requeued job goes on: the epochs done, the saved model, and the history of those epochs."""

    epoch: int
    load: Callable[[], Any]  # the checkpointed model
    history: dict[str, list[float]]


class TrainingHooks:
    """What the runner gives every fit: where events go, the stop request, checkpointing, requeue and resume."""

    def __init__(
        self, emit: EmitFn, checkpoint: Callable[..., None] | None = None, resume: Resume | None = None
    ) -> None:
        self.emit = emit
        self.checkpoint = checkpoint
        # Set by the runner's SIGINT handler: finish the current batch, then stop.
        self.stop_requested = threading.Event()
        # Set by a scheduler's warning signal during a fit: checkpoint after the batch, then Requeue.
        self.requeue_reason: str | None = None
        self.training = False
        self.resume = resume


_progress = threading.local()


def in_keras_progress() -> bool:
    """Whether this thread is inside Keras's fit progress bar, whose lines repeat the panel's epoch rows."""
    return getattr(_progress, "active", False)


def _mark_progress_output(keras: Any) -> None:
    """Wrap the ``ProgbarLogger`` methods that print a fit's epochs, so their writes can be told apart.

    Only the training ones: ``evaluate`` and ``predict`` bars are shown as printed (the panel has no rows for them).
    """
    logger = getattr(keras.callbacks, "ProgbarLogger", None)
    for name in ("on_epoch_begin", "on_train_batch_end", "on_epoch_end"):
        method = getattr(logger, name, None)
        if method is None or getattr(method, "_remote_magic", False):
            continue

        def marked(self: Any, *args: Any, _method: Callable[..., Any] = method, **kwargs: Any) -> Any:
            before, _progress.active = in_keras_progress(), True
            try:
                return _method(self, *args, **kwargs)
            finally:
                _progress.active = before

        marked._remote_magic = True  # type: ignore[attr-defined]
        setattr(logger, name, marked)


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
    _mark_progress_output(keras)

    def fit(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        callbacks = bound.arguments.get("callbacks")
        callbacks = [] if callbacks is None else list(callbacks)
        callbacks.append(event_callback_class(hooks))
        bound.arguments["callbacks"] = callbacks
        resume = hooks.resume
        epochs = bound.arguments.get("epochs", signature.parameters["epochs"].default)
        if resume is not None and int(bound.arguments.get("initial_epoch") or 0) < resume.epoch < epochs:
            hooks.resume = None  # the fit the job was in when it was requeued (the first one that long)
            restore(self, resume.load())
            bound.arguments["initial_epoch"] = resume.epoch
            hooks.emit(protocol.RESUMED, epoch=resume.epoch, epochs=epochs)
        hooks.training = True
        try:
            history = original_fit(*bound.args, **bound.kwargs)
        finally:
            hooks.training = False
        if resume is not None and hooks.resume is None and history is not None:
            _prepend_history(history, resume)
        return history

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
            if self.hooks.requeue_reason is not None:  # the epochs done, with this epoch's batches so far
                if self.hooks.checkpoint is not None:
                    self.hooks.checkpoint(self.model, self.epoch - 1, self.epochs, force=True)
                raise Requeue(self.hooks.requeue_reason)
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


def restore(model: Any, saved: Any) -> None:
    """Put a checkpointed model's weights and optimizer state into the cell's own model, which it goes on with."""
    model.set_weights(saved.get_weights())
    optimizer, saved_optimizer = getattr(model, "optimizer", None), getattr(saved, "optimizer", None)
    if optimizer is None or saved_optimizer is None or not saved_optimizer.variables:
        return
    if not getattr(optimizer, "built", True):
        optimizer.build(model.trainable_variables)
    if len(optimizer.variables) == len(saved_optimizer.variables):
        for variable, value in zip(optimizer.variables, saved_optimizer.variables, strict=True):
            variable.assign(value)


def _prepend_history(history: Any, resume: Resume) -> None:
    """The History of a resumed fit covers every epoch, those before the requeue included."""
    done = list(range(resume.epoch))
    history.epoch = done + list(getattr(history, "epoch", []))
    for key, values in resume.history.items():
        history.history[key] = list(values[: resume.epoch]) + list(history.history.get(key, []))

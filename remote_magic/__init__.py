"""remote_magic: train on a GPU host over SSH from a Jupyter cell."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# A widget whose comm stays open while the extension is loaded (see _open_widget_comm).
_held_widget: list[Any] = []


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext remote_magic``: register %%remote_train, %remote_status, %remote_attach, %remote_cancel."""
    from .magics import RemoteMagics

    ipython.register_magics(RemoteMagics)
    # a detached job's outputs enter the namespace between cells: the injector follows them
    ipython.magics_manager.registry["RemoteMagics"].lifecycle.inject.register()
    _open_widget_comm(ipython)


def _open_widget_comm(ipython: Any) -> None:
    """Open one widget comm now, in this short cell, and keep it open.

    JupyterLab 4.6 starts a kernel subshell for a comm target when the target's
    first comm opens, and deletes it when the last one closes; the kernel answers
    each with an idle status that JupyterLab shows as the kernel's, however busy
    the main shell is.  Without this the first panel of a training cell made the
    kernel read "Idle" for the whole cell.
    """
    if _held_widget or getattr(ipython, "kernel", None) is None:
        return
    try:
        import ipywidgets
    except ImportError:
        return
    _held_widget.append(ipywidgets.Widget())


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    """The jobs REST API for JupyterLab (remote_magic/server)."""
    from .server import RemoteMagicApp

    return [{"module": "remote_magic.server", "app": RemoteMagicApp}]


def unload_ipython_extension(ipython: Any) -> None:
    magics = ipython.magics_manager.registry.get("RemoteMagics")
    if magics is not None:
        magics.stop_background()
        magics.lifecycle.inject.unregister()  # after the followers stopped: what waits still goes in
        magics.connections.close()
    while _held_widget:
        _held_widget.pop().close()

"""remote_magic: train on a GPU host over SSH from a Jupyter cell."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext remote_magic``: register %%remote_train, %remote_status, %remote_attach, %remote_cancel."""
    from .magics import RemoteMagics

    ipython.register_magics(RemoteMagics)
    # a detached job's outputs enter the namespace between cells: the injector follows them
    ipython.magics_manager.registry["RemoteMagics"].lifecycle.inject.register()


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

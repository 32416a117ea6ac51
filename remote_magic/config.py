"""Settings that the magics and the server extension both declare, defined once.

Both read ``hosts`` and ``ssh_config`` the same way, so a host set up for the
notebook works the same in the JupyterLab sidebar.
"""

from __future__ import annotations

import os

from traitlets import Dict, Unicode

DEFAULT_SSH_CONFIG = os.path.join("~", ".ssh", "config")


def hosts_trait() -> Dict:
    return Dict(
        help="Per-host settings, e.g. {'gpu1': {'python': '/opt/venv/bin/python', 'root': '~/.remote_magic'}}."
    ).tag(config=True)


def ssh_config_trait() -> Unicode:
    return Unicode(
        os.environ.get("REMOTE_MAGIC_SSH_CONFIG", DEFAULT_SSH_CONFIG),
        help="The OpenSSH client config to read host aliases from ($REMOTE_MAGIC_SSH_CONFIG).",
    ).tag(config=True)

"""jupyter_server extension: an authenticated REST API over the same session layer as the magics.

    GET  /remote-magic/api/jobs[?fresh=1]                     every job in the local registry, live
    GET  /remote-magic/api/jobs/<host>/<job_id>/events?from=N the job's events from seq N
    POST /remote-magic/api/jobs/<host>/<job_id>/cancel        end the job (XSRF-protected)

Enabled automatically by the jupyter-config file the package installs.
"""

from .app import RemoteMagicApp

__all__ = ["RemoteMagicApp"]

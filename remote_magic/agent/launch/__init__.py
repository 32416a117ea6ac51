"""How a job's runner is started, watched and stopped: the ``Launcher`` seam and its launchers.

``base`` (the seam, and ``InJob``: a launcher's part inside the runner), ``host`` (the host's settings,
which pick a job's launcher), ``process`` (which launcher runs a job; the process launcher), ``local`` (a
runner process on this host: cold, warm or forked, with ``start``, ``warm``, ``detach``),
``queued`` with ``gpu_queue``, ``queue_folder``, ``queue_records`` and ``gpus`` (jobs that wait for GPUs),
``slurm`` with ``slurm_job`` (jobs Slurm runs, and what the runner does inside one).
"""

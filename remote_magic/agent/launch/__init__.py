"""How a job's runner is started, watched and stopped: the ``Launcher`` seam and its launchers.

``base`` (the seam), ``process`` (a runner process on this host: cold, warm or forked), ``gpu_queue``
with ``queue_folder`` and ``gpus`` (jobs that wait for GPUs), ``slurm`` (jobs Slurm runs).
"""

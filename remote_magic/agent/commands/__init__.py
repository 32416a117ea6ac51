"""The agent's commands, one module per concern: jobs (``job``: submit, follow, stop; ``spec``: what a submit
may ask), what the host stores (``store``: blobs, files, environments, gc), and the host itself (``host``:
hello, its GPUs, the processes the agent starts).  ``cli.py`` names them and runs one."""

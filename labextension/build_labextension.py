"""Build the prebuilt extension with JupyterLab's own core metadata (no network lookup).

`jupyter labextension build` otherwise asks the npm registry and GitHub for
@jupyterlab/core-meta; the staging folder of the installed jupyterlab has it.
"""

import os
import subprocess
import sys

import jupyterlab

core = os.path.join(os.path.dirname(jupyterlab.__file__), "staging")
subprocess.run([sys.executable, "-m", "jupyterlab.labextensions", "build", ".", "--core-path", core], check=True)

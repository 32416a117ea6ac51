"""What travels with a cell: the user's local modules (``modules.py``), the data files of ``--files`` and the
hashing of both (``files.py``, folders walked as git sees them in ``walk.py``), the pickled inputs
(``payload.py``) and the names a cell reads and writes (``capture.py``); ``envcheck.py`` compares the
packages here with the host's.  Client side: it reads the local disk and nothing else."""

from .files import FileSet, HashCache, ProjectFile, collect_files
from .modules import LocalModule, find_local_modules, is_local_module, local_origin, module_files
from .walk import ProjectError

__all__ = [
    "FileSet", "HashCache", "LocalModule", "ProjectError", "ProjectFile", "collect_files", "find_local_modules",
    "is_local_module", "local_origin", "module_files",
]  # fmt: skip

"""The user's own modules that travel with a job, found without importing them.

A module the cell needs is *local* when its source lies outside the standard library and every
site-packages folder (the host installs those itself).  It always travels as its whole top-level
package, found by ``ast`` (never by importing it), and the imports of what travels are followed until
nothing new is found.  Its files travel as ``ProjectFile``s, like those of ``--files``.
"""

from __future__ import annotations

import importlib.util
import os
import site
import sys
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from . import capture
from .files import HashCache, ProjectFile, hashed_files
from .walk import Found, ProjectError, Walker, stat_path


@dataclass(frozen=True)
class LocalModule:
    name: str  # top-level module or package name, e.g. "src" or "helpers"
    path: str  # the package folder or the single .py file
    import_root: str  # the folder that holds it: what the host puts on sys.path


@lru_cache(maxsize=1)
def _installed_roots() -> tuple[str, ...]:
    """Folders whose modules the host installs itself: the standard library and every site-packages."""
    roots: set[str] = set()
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        bases = {"base": prefix, "platbase": prefix, "installed_base": prefix, "installed_platbase": prefix}
        paths = sysconfig.get_paths(vars=bases)
        roots.update(paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib"))
    defaults = sysconfig.get_paths()
    roots.update(defaults[key] for key in ("stdlib", "platstdlib", "purelib", "platlib"))
    try:
        roots.update(site.getsitepackages())
    except AttributeError:  # some old virtualenv builds of site.py lack it
        pass
    roots.add(site.getusersitepackages())
    normalized = {os.path.abspath(r) for r in roots} | {os.path.realpath(r) for r in roots}
    return tuple(sorted(r.rstrip("/") + "/" for r in normalized))


def _installed(path: str) -> bool:
    """Under the standard library or a site-packages folder (also one that is not this interpreter's own,
    such as another environment put on sys.path)."""
    for candidate in {os.path.abspath(path), os.path.realpath(path)}:
        if candidate.startswith(_installed_roots()):
            return True
        parts = candidate.split(os.sep)
        if "site-packages" in parts or "dist-packages" in parts:
            return True
    return False


def _installed_by_a_distribution(import_root: str, top: str) -> bool:
    """A package that pip put in a folder of its own (``pip install --target``): a ``*.dist-info`` there lists it.

    Such a folder is no site-packages by name, but its packages are installed ones (maybe compiled): the host
    must install them, never get their .py files shipped.
    """
    try:
        names = os.listdir(import_root)
    except OSError:
        return False
    owned = (f"{top}/", f"{top}.py,", f"{top}/__init__.py,")
    for name in names:
        if not name.endswith(".dist-info"):
            continue
        folder = os.path.join(import_root, name)
        try:
            with open(os.path.join(folder, "top_level.txt"), encoding="utf-8") as f:
                if top in {line.strip() for line in f}:
                    return True
        except OSError:
            pass
        try:
            with open(os.path.join(folder, "RECORD"), encoding="utf-8") as f:
                if any(line.startswith(owned) for line in f):
                    return True
        except OSError:
            continue
    return False


def is_local_module(name: str) -> LocalModule | None:
    """The top-level package or module of ``name`` when it is the user's own source, else None.

    Looks at ``sys.modules`` first and otherwise asks the import system where the module would come from
    (``find_spec`` on the top-level name runs no module code), so an editable install resolves to its source.
    """
    top = name.split(".")[0]
    if not top.isidentifier() or top in ("__main__", "remote_magic") or top in sys.builtin_module_names:
        return None
    module = sys.modules.get(top)
    if module is not None:
        origin = getattr(module, "__file__", None)
        locations = getattr(module, "__path__", None)
    else:
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError, AttributeError):
            return None
        if spec is None:
            return None
        origin = spec.origin if spec.has_location else None
        locations = spec.submodule_search_locations
    if origin:
        origin = os.path.abspath(origin)
        if not origin.endswith(".py") or not os.path.isfile(origin) or _installed(origin):
            return None  # compiled only, inside a zip, frozen, or installed
        if locations is not None:  # a regular package: its __init__.py
            if os.path.basename(origin) != "__init__.py":
                return None
            folder = os.path.dirname(origin)
            found = LocalModule(top, folder, os.path.dirname(folder))
        else:
            found = LocalModule(top, origin, os.path.dirname(origin))
        return None if _installed_by_a_distribution(found.import_root, top) else found
    if locations is None:
        return None  # built in or frozen
    portions = [os.path.abspath(p) for p in list(locations)]
    if not portions or any(_installed(p) for p in portions) or not os.path.isdir(portions[0]):
        return None
    return LocalModule(top, portions[0], os.path.dirname(portions[0]))  # a namespace package


def find_local_modules(source: str, referenced: Iterable[str] = (), extra: Iterable[str] = ()) -> list[LocalModule]:
    """The local modules a job needs: those the cell imports, the ones the pickler met (``referenced``), the
    ones named with ``--modules`` (``extra``), and every local module their own files import, sorted by name.
    """
    wanted: dict[str, LocalModule] = {}
    for name in extra:
        name = name.strip()
        module = is_local_module(name) if name else None
        if module is None or _module_file(module, name) is None:
            raise ProjectError(
                f"--modules: no local module named {name!r} (it is not importable here, or it is installed in "
                f"site-packages, which the host must install itself)"
            )
        wanted[module.name] = module
    checked: set[str] = set(wanted)
    queue = [*_imported_names(source), *referenced]
    queue = [name for name in queue if name]
    pending = list(wanted.values())
    while queue or pending:
        for name in queue:
            top = name.split(".")[0]
            if top in checked:
                continue
            checked.add(top)
            module = is_local_module(top)
            if module is not None:
                wanted[top] = module
                pending.append(module)
        queue = []
        for module in pending:
            for path in _python_files(module):
                queue.extend(_imported_names(path, from_file=True))
        pending = []
    return [wanted[name] for name in sorted(wanted)]


def _imported_names(source: str, from_file: bool = False) -> list[str]:
    """Top-level names of the absolute imports in ``source`` (or in the file it names); relative ones stay inside
    their package, and a file that cannot be read imports nothing here (it fails on the host with its own error)."""
    if from_file:
        try:
            with open(source, encoding="utf-8", errors="replace") as f:
                source = f.read()
        except OSError:
            return []
    return capture.imported_modules(source)


def _python_files(module: LocalModule) -> list[str]:
    if not os.path.isdir(module.path):
        return [module.path]
    return sorted(local for _, local, _ in _walk(module, "") if local.endswith(".py"))


def _walk(module: LocalModule, rel_top: str) -> list[Found]:
    """The files of a package folder as git sees them, bytecode left out."""
    walker = Walker(boundary=module.import_root, skip_file=lambda name: name.endswith((".pyc", ".pyo")))
    return walker.walk(module.path, rel_top)


def module_files(modules: list[LocalModule], cache: HashCache | None = None) -> list[ProjectFile]:
    """Every file of each module, hashed; rel starts with the module's name (``src/models/__init__.py``,
    ``helpers.py``), so all modules can sit in one folder on the host's sys.path, even an editable install
    whose package folder is named differently from the package."""
    found: list[Found] = []
    for module in modules:
        if os.path.isdir(module.path):
            found.extend(_walk(module, module.name))
        else:
            found.append((f"{module.name}.py", module.path, stat_path(module.path)))
    return hashed_files(found, cache)


def local_origin(module_name: str) -> str | None:
    """Where ``module_name`` comes from here, in words, when it is local (for a host's ModuleNotFoundError):
    "the local file /home/u/proj/src/models/__init__.py"; None when it is not local or not found here either."""
    module = is_local_module(module_name)
    if module is None:
        return None
    path = _module_file(module, module_name)
    if path is None:
        return None
    return f"the local folder {path}" if os.path.isdir(path) else f"the local file {path}"


def _module_file(module: LocalModule, dotted: str) -> str | None:
    """The file (or namespace folder) of ``dotted`` inside ``module``, found without importing anything."""
    loaded = sys.modules.get(dotted)
    loaded_file = getattr(loaded, "__file__", None) if loaded is not None else None
    if loaded_file and loaded_file.endswith(".py"):
        return os.path.abspath(loaded_file)
    parts = dotted.split(".")[1:]
    if not os.path.isdir(module.path):
        return None if parts else module.path
    path = module.path
    for part in parts:
        path = os.path.join(path, part)
    for candidate in (os.path.join(path, "__init__.py"), path + ".py"):
        if os.path.isfile(candidate):
            return candidate
    return path if os.path.isdir(path) else None

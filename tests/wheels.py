"""Tiny pure-Python wheels built on the spot, so environment tests install without a network."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import zipfile
from collections.abc import Iterable


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode("ascii")


def build_wheel(
    folder: str | os.PathLike[str],
    name: str,
    version: str,
    requires: Iterable[str] = (),
    module: str | None = None,
    source: str = "",
) -> str:
    """Write ``<name>-<version>-py3-none-any.whl`` into ``folder``; return its path.

    The wheel holds one package, ``module`` (default: ``name`` with ``-`` and
    ``.`` as ``_``), whose ``__init__.py`` sets ``__version__`` and then runs
    ``source``; ``requires`` become ``Requires-Dist`` lines.
    """
    stem = re.sub(r"[-_.]+", "_", name)
    module = module or stem.lower()
    dist_info = f"{stem}-{version}.dist-info"
    metadata = "".join(
        [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", *(f"Requires-Dist: {r}\n" for r in requires)]
    )
    files = {
        f"{module}/__init__.py": f"__version__ = {version!r}\n{source}",
        f"{dist_info}/METADATA": metadata,
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: remote_magic-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},{_record_hash(text.encode())},{len(text.encode())}\n" for path, text in files.items())
    files[f"{dist_info}/RECORD"] = record + f"{dist_info}/RECORD,,\n"
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{stem}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for member, text in files.items():
            wheel.writestr(member, text)
    return path

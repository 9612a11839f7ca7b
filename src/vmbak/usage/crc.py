"""crc32c (Castagnoli) for the filesystem parsers, from the ``crc32c`` package's C extension.

The package's ``__init__`` looks up its own version in the installed distribution's
metadata (``importlib.metadata``, which brings ``email``, ``csv``, ``zipfile``, ...) and
imports its command-line module: about 13 ms of CPU at every start of a backup, which
parses the guest's ext4 on every incremental. The extension module (``crc32c._crc32c``,
the same function the package exports) is loaded here by itself; should the package be
laid out otherwise, it is imported as usual.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def _load() -> Callable[..., int]:
    import importlib.machinery
    import importlib.util

    if "crc32c" in sys.modules:
        return sys.modules["crc32c"].crc32c
    try:
        spec = importlib.util.find_spec("crc32c")  # finds the package without running it
    except (ImportError, ValueError):
        spec = None
    for d in (spec.submodule_search_locations or []) if spec is not None else []:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(d, "_crc32c" + suffix)
            if not os.path.isfile(path):
                continue
            try:
                loader = importlib.machinery.ExtensionFileLoader("crc32c._crc32c", path)
                mod = importlib.util.module_from_spec(importlib.util.spec_from_loader("crc32c._crc32c", loader))
                loader.exec_module(mod)
                return mod.crc32c
            except (ImportError, AttributeError):
                break
    import crc32c as package

    return package.crc32c


crc32c: Callable[..., int] = _load()

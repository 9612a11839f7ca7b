"""The helpers of tests/usage/conftest.py as a module, for code that cannot take fixtures
(hypothesis tests). Loaded from this directory's file by path: ``import conftest`` would
return whichever of the suite's conftest modules was registered first under that name."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_NAME = "vmbak_usage_conftest"


def usage_helpers() -> ModuleType:
    mod = sys.modules.get(_NAME)
    if mod is None:
        spec = importlib.util.spec_from_file_location(_NAME, Path(__file__).with_name("conftest.py"))
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[_NAME] = mod
        spec.loader.exec_module(mod)
    return mod

"""Optional backends: a missing one is a one-line error naming the extra that installs it."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from selfimprove.errors import ConfigError


def available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def require(module: str, extra: str, wanted_by: str) -> ModuleType:
    """Imports `module`, or raises ConfigError: "<wanted_by> needs <module>: pip install 'selfimprove[extra]'"."""
    if not available(module):
        raise ConfigError(f"{wanted_by} needs {module}: pip install 'selfimprove[{extra}]'")
    try:
        return importlib.import_module(module)
    except Exception as e:  # installed but broken (e.g. built for another torch): still one line
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConfigError(
            f"{wanted_by}: {module} is installed but fails to import ({type(e).__name__}: {first})"
        ) from None

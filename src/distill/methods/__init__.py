"""Distillation methods: each a small ``nn.Module`` registered with its paper and defaults.

Importing this package imports every module in it, which registers every method; use
:func:`list_methods`, :func:`method_info` and :func:`create_method` to browse and build them.
Each registered class is also importable from here (``distill.methods.KD``).
"""

import importlib as _importlib
import pkgutil as _pkgutil

from distill.methods.base import (
    Method,
    MethodInfo,
    Paper,
    create_method,
    list_methods,
    method_info,
    register,
)
from distill.methods.base import _REGISTRY

for _info in _pkgutil.iter_modules(__path__):
    if _info.name != "base":
        _importlib.import_module(f"{__name__}.{_info.name}")

for _entry in list(_REGISTRY.values()):
    globals()[_entry.cls.__name__] = _entry.cls

__all__ = ["Method", "MethodInfo", "Paper", "create_method", "list_methods", "method_info", "register",
           *sorted(e.cls.__name__ for e in _REGISTRY.values())]

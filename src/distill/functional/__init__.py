"""The math of distillation: one pure function per loss, its equation in its docstring.

Like ``torch.nn.functional`` beside ``torch.nn``: methods call these, tests check them against
numbers worked out independently. Each family lives in its own module of this package; every
public name is re-exported here, so ``distill.functional.kd_loss`` is the address to use.
"""

import importlib as _importlib
import pkgutil as _pkgutil

__all__: list[str] = []

# core first (logits, FitNets, AT, relations), then every other module of the package in name order
for _name in ["core"] + sorted(m.name for m in _pkgutil.iter_modules(__path__) if m.name != "core"):
    _module = _importlib.import_module(f"{__name__}.{_name}")
    for _public in getattr(_module, "__all__", ()):
        if _public in __all__:  # a second module's name would silently replace the first's here
            raise ImportError(f"distill.functional.{_name} exports {_public!r}, which another module of the "
                              "package already exports: rename one")
        globals()[_public] = getattr(_module, _public)
        __all__.append(_public)

"""A normswap layer followed by a site's drop and activation (timm's ``*Act`` norms).

``act_class(L1BatchNorm2d)`` is ``L1BatchNorm2dAct``: the base layer's forward, then
``self.drop`` and ``self.act``, keeping the base's parameters and state-dict keys. The
classes are made on demand and are importable by name from this module (a module-level
``__getattr__`` makes them on first lookup), so a pickled model loads in a new process.
"""
from __future__ import annotations

import sys
from typing import Dict, Optional

from torch import nn

from ..norms.base import NORMSWAP_LEAF_MODULES, register_normalizer

_SUFFIX = "Act"
_ACT_CLASSES: Dict[type, type] = {}


def act_class(base: type) -> type:
    """``base`` followed by ``drop`` then ``act`` (cached, importable from this module)."""
    cls = _ACT_CLASSES.get(base)
    if cls is not None:
        return cls

    def forward(self, x):
        return self.act(self.drop(base.forward(self, x)))

    name = base.__name__ + _SUFFIX
    cls = type(name, (base,), {"forward": forward, "__module__": __name__, "__qualname__": name,
                               "__doc__": f"{base.__name__}, then the site's drop and activation."})
    register_normalizer(cls)
    _ACT_CLASSES[base] = cls
    setattr(sys.modules[__name__], name, cls)
    return cls


def attach_act(new: nn.Module, act: Optional[nn.Module], drop: Optional[nn.Module]) -> nn.Module:
    """Give ``new`` the drop and activation of the site it replaces (if it had them)."""
    if act is not None:
        new.__class__ = act_class(type(new))
        new.drop = drop if drop is not None else nn.Identity()
        new.act = act
    return new


def __getattr__(name: str):
    """``L1BatchNorm2dAct`` and friends, made on first lookup (unpickling in a new process)."""
    if name.endswith(_SUFFIX):
        import normswap.norms  # noqa: F401 - registers the package's normalizers
        base_name = name[: -len(_SUFFIX)]
        for base in list(NORMSWAP_LEAF_MODULES):
            if base.__name__ == base_name and base.__module__ != __name__:
                return act_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""timm entry points for the derived models: ``derived_<name>`` for every hand-written ``mixers`` model name.

``timm.create_model("derived_imixer_t4_28", h_ratio=2)`` builds the hand-written model with the same arguments
(and so the same initialisation) and returns its derived twin (``derive.from_reference``).
"""

from __future__ import annotations

from typing import Any

from timm.models import is_model, model_entrypoint, register_model

import mixers

from .models import DerivedMixer, from_reference

__all__ = ["DERIVED_MODEL_NAMES"]


def _entrypoint(name: str, source: str):
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> DerivedMixer:
        if pretrained:
            raise RuntimeError(f"no pretrained weights exist for {name!r}; create it with pretrained=False")
        return from_reference(model_entrypoint(source)(pretrained=False, **kwargs))

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{name}: the derived twin of {source} (same arguments, same initialisation)."
    return entrypoint


DERIVED_MODEL_NAMES: tuple[str, ...] = tuple(f"derived_{n}" for n in mixers.MODEL_NAMES)

for _src in mixers.MODEL_NAMES:
    _name = f"derived_{_src}"
    if is_model(_name) and model_entrypoint(_name).__module__ != __name__:
        raise RuntimeError(f"timm already has a model named {_name!r} from {model_entrypoint(_name).__module__}")
    globals()[_name] = register_model(_entrypoint(_name, _src))
del _src, _name

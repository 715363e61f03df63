"""timm entry points for the derived models: ``derived_<name>`` for every hand-written ``mixers`` model name.

``timm.create_model("derived_imixer_t4_28", h_ratio=2)`` builds the hand-written model with the same arguments
(and so the same initialisation) and returns its derived twin (``derive.from_reference``).
"""

from __future__ import annotations

from typing import Any

from timm.models import model_entrypoint

import mixers
from mixers.models import register_entrypoints

from .models import DerivedMixer, from_reference

__all__ = ["DERIVED_MODEL_NAMES"]


def _entrypoint(name: str, source: str):
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> DerivedMixer:
        if pretrained:
            raise RuntimeError(f"no pretrained weights exist for {name!r}; create it with pretrained=False")
        return from_reference(model_entrypoint(source)(pretrained=False, **kwargs))

    entrypoint.__doc__ = f"{name}: the derived twin of {source} (same arguments, same initialisation)."
    return entrypoint


DERIVED_MODEL_NAMES: tuple[str, ...] = tuple(f"derived_{n}" for n in mixers.MODEL_NAMES)

register_entrypoints({d: _entrypoint(d, n) for d, n in zip(DERIVED_MODEL_NAMES, mixers.MODEL_NAMES)}, globals())

"""timm entry points for the derived models: ``derived_<name>`` for every hand-written ``mixers`` model name, and
``derived_spec_<size>`` for a model of any network spec.

``timm.create_model("derived_imixer_t4_28", h_ratio=2)`` builds the hand-written model with the same arguments
(and so the same initialisation) and returns its derived twin (``derive.from_reference``).
``timm.create_model("derived_spec_t4_28", spec="net.yaml", n_iter=2)`` builds a model whose blocks are the
spec's derived blocks (``derive.spec_block``); ``spec`` is a ``NetworkSpec``, its plain data, a YAML file's path
or a name given to ``derive.register_spec``. ``derived_spec`` has ``DerivedMixerConfig``'s default sizes.
"""

from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Any

from timm.models import model_entrypoint

import mixers
from mixers.backbone import create_registered, register_entrypoints, split_kwargs
from mixers.models import SIZES

from .convert import from_reference
from .models import DerivedMixer, DerivedMixerConfig, spec_block
from .spec import load_spec

__all__ = ["DERIVED_MODEL_NAMES", "SPEC_MODEL_NAMES"]


def _entrypoint(name: str, source: str):
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> DerivedMixer:
        def build(kw: dict[str, Any]) -> DerivedMixer:  # (features_only, device, dtype: create_registered's)
            try:
                reference = model_entrypoint(source)(pretrained=False, **kw)
            except (TypeError, ValueError) as e:  # the reference's own message, said of this name
                raise type(e)(f"{name} (the derived twin of {source}): {e}") from None
            return from_reference(reference)

        return create_registered(name, pretrained, kwargs, build)

    entrypoint.__doc__ = f"{name}: the derived twin of {source} (same arguments, same initialisation)."
    return entrypoint


_CONFIG_FIELDS = frozenset(f.name for f in fields(DerivedMixerConfig)) - {"block", "block_kwargs", "spec", "mlp_ratio"}
_SPEC_OPTIONS = frozenset(inspect.signature(spec_block).parameters) - {"spec", "seq_len", "dim", "drop_path"}


def _spec_entrypoint(name: str, size: dict[str, Any]):
    def entrypoint(pretrained: bool = False, spec=None, **kwargs: Any) -> DerivedMixer:
        def build(kw: dict[str, Any]) -> DerivedMixer:
            if spec is None:
                raise TypeError(f"{name}() needs spec= (a NetworkSpec, its plain data, a YAML file's path or a name "
                                "given to derive.register_spec)")
            cfg, options = split_kwargs(name, kw, _CONFIG_FIELDS, _SPEC_OPTIONS, "DerivedMixerConfig")
            return DerivedMixer(DerivedMixerConfig(block="spec", spec=load_spec(spec).to_dict(), block_kwargs=options,
                                                   **{**size, **cfg}))

        return create_registered(name, pretrained, kwargs, build)

    entrypoint.__doc__ = f"{name}: a DerivedMixer ({size or 'DerivedMixerConfig defaults'}) of any network spec."
    return entrypoint


DERIVED_MODEL_NAMES: tuple[str, ...] = tuple(f"derived_{n}" for n in mixers.MODEL_NAMES)
SPEC_MODEL_NAMES: tuple[str, ...] = ("derived_spec", *(f"derived_spec_{size}" for size in SIZES))

register_entrypoints({d: _entrypoint(d, n) for d, n in zip(DERIVED_MODEL_NAMES, mixers.MODEL_NAMES)}, globals())
register_entrypoints({"derived_spec": _spec_entrypoint("derived_spec", {}),
                      **{f"derived_spec_{k}": _spec_entrypoint(f"derived_spec_{k}", v) for k, v in SIZES.items()}},
                     globals())

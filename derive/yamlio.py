"""YAML as this project reads it: PyYAML's safe loader, with numbers read as YAML 1.2 reads them.

PyYAML follows YAML 1.1, where a float needs a dot: ``1e-3`` is the string ``'1e-3'`` and only ``1.0e-3`` a number.
Config values without a declared type (``model_kwargs``, a network spec's Lagrangian parameters) would then reach a
model as strings. `safe_load` reads ``1e-3``, ``-2E+4`` and ``.5e1`` as floats; everything else is PyYAML's.
"""

from __future__ import annotations

import re

import yaml

__all__ = ["safe_load"]


class _Loader(yaml.SafeLoader):
    """`yaml.SafeLoader` plus YAML 1.2's exponent floats without a dot."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def safe_load(text: str):
    """``yaml.safe_load(text)``, except that ``1e-3`` is the float 0.001 (YAML 1.2), not a string."""
    return yaml.load(text, Loader=_Loader)

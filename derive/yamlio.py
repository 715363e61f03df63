"""YAML as this project reads it: PyYAML's safe loader, with numbers read as YAML 1.2 reads them.

PyYAML follows YAML 1.1, where a float needs a dot: ``1e-3`` is the string ``'1e-3'`` and only ``1.0e-3`` a number.
Config values without a declared type (``model_kwargs``, a network spec's Lagrangian parameters) would then reach a
model as strings. `safe_load` reads ``1e-3``, ``-2E+4`` and ``.5e1`` as floats, and refuses a mapping that gives
one key twice (PyYAML keeps the last silently: a second ``epochs:`` at the end of a config, or two layers of one
name in a spec, would win unnoticed); everything else is PyYAML's. `load_file` reads a file with it, and `number`
reads an exponent float that plain PyYAML left as a string (data loaded by ``yaml.safe_load`` elsewhere). A date
such as ``2024-01-01`` stays a string (YAML 1.2 has no implicit timestamps).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

__all__ = ["load_file", "number", "safe_load"]

_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """`yaml.SafeLoader` plus YAML 1.2's exponent floats without a dot, and no key twice in a mapping."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
            if first is not key_node:
                raise yaml.YAMLError(f"line {key_node.start_mark.line + 1}: the key {key!r} is given a second time "
                                     f"(first on line {first.start_mark.line + 1}); only one can hold")
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))
# YAML 1.2 has no implicit timestamps: 2024-01-01 is a string, not a datetime.date that no config key takes and JSON
# (a sweep's overrides, a run's summary) cannot hold
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in _Loader.yaml_implicit_resolvers.items()}


def safe_load(text: str):
    """``yaml.safe_load(text)``, except that ``1e-3`` is the float 0.001 (YAML 1.2), not a string, ``2024-01-01`` a
    string, not a date, and a key given twice in one mapping is a ``yaml.YAMLError``."""
    return yaml.load(text, Loader=_Loader)


def load_file(path: str | Path):
    """`safe_load` of a file's text; a file that is not UTF-8 text is a ``yaml.YAMLError`` too."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise yaml.YAMLError(f"it is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})") from None
    return safe_load(text)


def number(value):
    """``value``, except that a string such as ``'1e-6'`` (an exponent float that YAML 1.1 leaves a string) is the
    float it spells."""
    if isinstance(value, str) and _EXPONENT_FLOAT.match(value.strip()):
        return float(value.replace("_", ""))
    return value

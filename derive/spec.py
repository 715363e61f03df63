"""Network specs: a block's hierarchical Hopfield network written down as data, in Python or YAML (one schema).

A spec names the layers (a state shape in tokens x channels, a Lagrangian, a time constant tau), the synapses
(the two layers, the axis they couple, the feedback form, biases, a LayerNorm affine), the visible layer, and how
one Euler step splits over the visible layer's neighbours. Sizes are integers or arithmetic in ``S`` (tokens) and
``C`` (channels) of the model it goes into, and in the spec's own named ``sizes``, so one spec fits every model
size; ``build(S, C)`` makes the ``hopfield.Network``. Example, the iMixer block (the ``"imixer"`` preset)::

    visible: v
    splitting: sequential                   # tokens, then channels; or parallel (one shared step)
    sizes: {T: int(0.5 * C), H: int(T * 2)}
    affines: {norm1: [C], norm2: [C]}       # LayerNorm affines, each folded into the synapses that name it
    layers:
      v: {shape: [S, C], lagrangian: {name: layernorm, axis: -1, eps: 1.0e-6}, tau: 1.0}
      x: {shape: [T, C], lagrangian: gelu, tau: 0.1}
      h: {shape: [H, C], lagrangian: gelu, tau: 0.01}
      c: {shape: [S, 4 * C], lagrangian: gelu, tau: 0.1}
    synapses:
      - {layers: [v, x], axis: -2, form: untied, bias: true, affine: norm1}
      - {layers: [x, h], axis: -2, form: untied, bias: true}
      - {layers: [v, c], axis: -1, form: untied, bias: true, affine: norm2}

Lagrangians are ``hopfield.lagrangians.from_spec`` data (a name, or a mapping with ``name`` and parameters).
``form`` is ``tied`` (Krotov's symmetric synapse), ``untied`` or ``broken``; ``bias`` adds a current into the
second layer, ``bias_fb`` into the first (default: ``bias`` unless tied). A size expression may use + - * / //,
parentheses, numbers, ``int(...)`` and the names above; a fractional result is truncated, as the Mixer's
``int(ratio * dim)``. Every error names the offending entry (``layers.x.shape``, ``synapses[1].form``, ...).
"""

from __future__ import annotations

import ast
import math
import numbers
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hopfield import Affine, DenseSynapse, Layer, Network
from hopfield import lagrangians as lag

from . import yamlio

__all__ = ["LayerSpec", "NetworkSpec", "SpecError", "SynapseSpec", "load_spec", "register_spec", "registered_specs"]

SPLITTINGS = ("parallel", "sequential")
FORMS = ("tied", "untied", "broken")
_SPEC_KEYS = ("visible", "splitting", "groups", "sizes", "affines", "layers", "synapses", "kind")
_LAYER_KEYS = ("shape", "lagrangian", "tau")
_SYNAPSE_KEYS = ("layers", "axis", "form", "bias", "bias_fb", "affine")


class SpecError(ValueError):
    """A network spec that does not describe a network: the message names the entry."""


Size = int | str


@dataclass
class LayerSpec:
    shape: tuple[Size, ...]
    lagrangian: dict
    tau: float = 1.0


@dataclass
class SynapseSpec:
    layers: tuple[str, str]
    axis: int = -1
    form: str = "untied"
    bias: bool = False
    bias_fb: bool | None = None
    affine: str | None = None


# ---------------------------------------------------------------------------------------------- sizes
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv}


def _eval_size(expr: Size, env: Mapping[str, int], where: str) -> int:
    """An integer size from an int or an arithmetic expression in the names of ``env``; SpecError naming
    ``where`` otherwise."""
    if isinstance(expr, bool) or not isinstance(expr, (int, str)):
        raise SpecError(f"{where}: a size is an integer or an expression in {sorted(env)}, got {expr!r}")
    if isinstance(expr, int):
        value = expr
    else:
        try:
            tree = ast.parse(expr.strip(), mode="eval")
        except SyntaxError:
            raise SpecError(f"{where}: {expr!r} is not an arithmetic expression") from None

        def ev(node):
            if isinstance(node, ast.Expression):
                return ev(node.body)
            if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
                    and not isinstance(node.value, bool):
                return node.value
            if isinstance(node, ast.Name):
                if node.id not in env:
                    raise SpecError(f"{where}: unknown size {node.id!r} in {expr!r}; known: {sorted(env)}")
                return env[node.id]
            if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
                b = ev(node.right)
                if isinstance(node.op, (ast.Div, ast.FloorDiv)) and b == 0:
                    raise SpecError(f"{where}: division by zero in {expr!r}")
                return _BINOPS[type(node.op)](ev(node.left), b)
            if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
                return -ev(node.operand)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "int" \
                    and len(node.args) == 1 and not node.keywords:
                return int(ev(node.args[0]))
            raise SpecError(f"{where}: {expr!r} may use numbers, {sorted(env)}, + - * / //, parentheses and "
                            "int(...) only")

        value = ev(tree)
        if isinstance(value, float):
            if not math.isfinite(value):
                raise SpecError(f"{where}: {expr!r} is not finite")
            value = int(value)
    if value < 1:
        raise SpecError(f"{where}: {expr!r} gives {value}, a size must be >= 1")
    return value


def _size_names(expr: Size) -> set[str]:
    """The names an expression refers to (none for an int or an expression that does not parse: _eval_size says
    what is wrong with it)."""
    if not isinstance(expr, str):
        return set()
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        return set()
    calls = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and id(n) not in calls}


# ---------------------------------------------------------------------------------------------- the spec
@dataclass
class NetworkSpec:
    """A block's network as data; see the module doc. ``kind`` marks the preset families (``"mixer"``,
    ``"imixer"``, ...), whose blocks carry the hand-written modules' weight names (``derive.to_reference``)."""

    layers: dict[str, LayerSpec]
    synapses: list[SynapseSpec]
    visible: str = "v"
    splitting: str = "parallel"
    groups: list[list[str]] | None = None
    sizes: dict[str, Size] = field(default_factory=dict)
    affines: dict[str, tuple[Size, ...]] = field(default_factory=dict)
    kind: str | None = None

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """The structure is sound (names, forms, axes, references); sizes are checked by ``build``."""
        if not isinstance(self.layers, dict) or not self.layers:
            raise SpecError("layers: a spec needs a mapping of layer names to layers")
        for name, layer in self.layers.items():
            where = f"layers.{name}"
            if not isinstance(name, str) or not name.isidentifier():
                raise SpecError(f"{where}: a layer name is an identifier, got {name!r}")
            if not isinstance(layer, LayerSpec):
                raise SpecError(f"{where}: expected a LayerSpec, got {type(layer).__name__}")
            if not isinstance(layer.shape, (tuple, list)) or not layer.shape:
                raise SpecError(f"{where}.shape: a non-empty list of sizes, got {layer.shape!r}")
            try:
                lag.from_spec(layer.lagrangian)
            except (ValueError, TypeError) as e:
                raise SpecError(f"{where}.lagrangian: {e}") from None
            if isinstance(layer.tau, bool) or not isinstance(layer.tau, (int, float)) or \
                    not (math.isfinite(layer.tau) and layer.tau > 0):
                raise SpecError(f"{where}.tau: a finite number > 0, got {layer.tau!r}")
        if not isinstance(self.visible, str) or self.visible not in self.layers:
            raise SpecError(f"visible: {self.visible!r} is not a layer; layers are {list(self.layers)}")
        if self.splitting not in SPLITTINGS:
            raise SpecError(f"splitting: one of {SPLITTINGS}, got {self.splitting!r}")
        if not isinstance(self.synapses, list) or not self.synapses:
            raise SpecError("synapses: a spec needs a list of synapses")
        for k, syn in enumerate(self.synapses):
            where = f"synapses[{k}]"
            if not isinstance(syn, SynapseSpec):
                raise SpecError(f"{where}: expected a SynapseSpec, got {type(syn).__name__}")
            if not (isinstance(syn.layers, (tuple, list)) and len(syn.layers) == 2):
                raise SpecError(f"{where}.layers: two layer names, got {syn.layers!r}")
            for n in syn.layers:
                if not isinstance(n, str) or n not in self.layers:
                    raise SpecError(f"{where}.layers: {n!r} is not a layer; layers are {list(self.layers)}")
            if syn.layers[0] == syn.layers[1]:
                raise SpecError(f"{where}.layers: a synapse couples two different layers, got {list(syn.layers)}")
            if isinstance(syn.axis, bool) or not isinstance(syn.axis, int):
                raise SpecError(f"{where}.axis: an integer axis of the layers' shape, got {syn.axis!r}")
            if syn.form not in FORMS:
                raise SpecError(f"{where}.form: one of {FORMS}, got {syn.form!r}")
            for key in ("bias", "bias_fb"):
                v = getattr(syn, key)
                if not (isinstance(v, bool) or (key == "bias_fb" and v is None)):
                    raise SpecError(f"{where}.{key}: true or false, got {v!r}")
            if syn.affine is not None and (not isinstance(syn.affine, str) or syn.affine not in self.affines):
                raise SpecError(f"{where}.affine: {syn.affine!r} is not in affines {list(self.affines)}")
        for name in self.sizes:
            if not (isinstance(name, str) and name.isidentifier()) or name in ("S", "C", "int"):
                raise SpecError(f"sizes: {name!r} is not a usable size name (an identifier other than S, C, int)")
        for name, shape in self.affines.items():
            if not isinstance(shape, (tuple, list)) or not shape:
                raise SpecError(f"affines.{name}: a non-empty list of sizes, got {shape!r}")
        if self.groups is not None:
            if self.splitting != "sequential":
                raise SpecError("groups: only a sequential splitting has groups of sub-steps")
            if not (isinstance(self.groups, list) and all(isinstance(g, list) and g for g in self.groups)):
                raise SpecError(f"groups: a list of non-empty lists of layer names, got {self.groups!r}")
            for g in self.groups:
                for n in g:
                    if not isinstance(n, str) or n not in self.layers or n == self.visible:
                        raise SpecError(f"groups: {n!r} is not a hidden layer of this spec")

    def resolve_sizes(self, seq_len: int, dim: int) -> dict[str, int]:
        """``S``, ``C`` and every named size, each once the sizes it names are known: the order they are written
        in does not matter (a stored config.yaml lists them sorted by name), a cycle is an error."""
        for name, n in (("seq_len", seq_len), ("dim", dim)):  # int() would floor 4.5 to 4 without a word
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
                raise SpecError(f"{name} ({'S, the tokens' if name == 'seq_len' else 'C, the channels'}) must be an "
                                f"integer >= 1, got {n!r}")
        env = {"S": int(seq_len), "C": int(dim)}
        pending = dict(self.sizes)
        needs = {n: _size_names(e) for n, e in pending.items()}
        while pending:
            # ready: every name it needs is known, or one is defined nowhere (then _eval_size names it)
            ready = [n for n in pending if needs[n] <= env.keys() or not needs[n] <= env.keys() | pending.keys()]
            if not ready:
                raise SpecError(f"sizes: {sorted(pending)} refer to each other in a cycle: "
                                + ", ".join(f"{n}: {e!r}" for n, e in pending.items()))
            for name in ready:
                env[name] = _eval_size(pending.pop(name), env, f"sizes.{name}")
        return env

    # ------------------------------------------------------------------ build
    def build(self, seq_len: int, dim: int) -> Network:
        """The network for a model with ``seq_len`` tokens of ``dim`` channels."""
        env = self.resolve_sizes(seq_len, dim)
        layers = {}
        for name, ls in self.layers.items():
            shape = tuple(_eval_size(s, env, f"layers.{name}.shape[{i}]") for i, s in enumerate(ls.shape))
            try:
                layers[name] = Layer(shape, lag.from_spec(ls.lagrangian), float(ls.tau))
            except ValueError as e:
                raise SpecError(f"layers.{name}: {e}") from None
        if layers[self.visible].shape != (int(seq_len), int(dim)):
            raise SpecError(f"layers.{self.visible}.shape: the visible layer is the model's token x channel state "
                            f"(S, C) = {(int(seq_len), int(dim))}, got {layers[self.visible].shape}")
        affines = {name: Affine(tuple(_eval_size(s, env, f"affines.{name}[{i}]") for i, s in enumerate(shape)))
                   for name, shape in self.affines.items()}
        synapses = [DenseSynapse(*syn.layers, axis=syn.axis, form=syn.form, bias=syn.bias, bias_fb=syn.bias_fb,
                                 affine=affines[syn.affine] if syn.affine else None) for syn in self.synapses]
        try:
            return Network(layers, synapses)
        except (ValueError, TypeError) as e:
            raise SpecError(f"the spec's network does not fit together at S = {seq_len}, C = {dim}: {e}") from None

    # ------------------------------------------------------------------ as data
    def to_dict(self) -> dict:
        """Plain data (lists, not tuples): what YAML and a run folder's config hold; ``from_dict`` reads it."""
        out: dict = {"visible": self.visible, "splitting": self.splitting}
        if self.groups is not None:
            out["groups"] = [list(g) for g in self.groups]
        if self.sizes:
            out["sizes"] = dict(self.sizes)
        if self.affines:
            out["affines"] = {k: list(v) for k, v in self.affines.items()}
        out["layers"] = {n: {"shape": list(ls.shape), "lagrangian": dict(ls.lagrangian), "tau": float(ls.tau)}
                         for n, ls in self.layers.items()}
        syns = []
        for s in self.synapses:
            d = {"layers": list(s.layers), "axis": s.axis, "form": s.form, "bias": s.bias}
            if s.bias_fb is not None:
                d["bias_fb"] = s.bias_fb
            if s.affine is not None:
                d["affine"] = s.affine
            syns.append(d)
        out["synapses"] = syns
        if self.kind is not None:
            out["kind"] = self.kind
        return out

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "spec") -> NetworkSpec:
        """A spec from plain data (``to_dict``'s, or a YAML file's); SpecError naming the entry."""
        if not isinstance(data, Mapping):
            raise SpecError(f"{where}: a network spec is a mapping, got {type(data).__name__}")
        unknown = [k for k in data if k not in _SPEC_KEYS]
        if unknown:
            raise SpecError(f"{where}: unknown key(s) {unknown}; a spec has {list(_SPEC_KEYS)}")
        layers_in = data.get("layers")
        if not isinstance(layers_in, Mapping) or not layers_in:
            raise SpecError(f"{where}: 'layers' must map layer names to layers")
        layers = {}
        for name, body in layers_in.items():
            lw = f"layers.{name}"
            if not isinstance(body, Mapping):
                raise SpecError(f"{lw}: a mapping with {list(_LAYER_KEYS)}, got {body!r}")
            bad = [k for k in body if k not in _LAYER_KEYS]
            if bad or "shape" not in body or "lagrangian" not in body:
                raise SpecError(f"{lw}: needs 'shape' and 'lagrangian' (and may have 'tau'), got keys {list(body)}")
            lagr = body["lagrangian"]
            lagr = {"name": lagr} if isinstance(lagr, str) else lagr
            if not isinstance(lagr, Mapping):
                raise SpecError(f"{lw}.lagrangian: a name or a mapping with a 'name', got {lagr!r}")
            shape = body["shape"]
            if not isinstance(shape, (list, tuple)):
                raise SpecError(f"{lw}.shape: a list of sizes, got {shape!r}")
            # data read by plain yaml.safe_load keeps YAML 1.1's '1e-6' a string: read it as the number it spells
            lagr = {k: yamlio.number(v) for k, v in lagr.items()}
            layers[name] = LayerSpec(tuple(shape), lagr, yamlio.number(body.get("tau", 1.0)))
        syns_in = data.get("synapses")
        if not isinstance(syns_in, list) or not syns_in:
            raise SpecError(f"{where}: 'synapses' must be a list of synapses")
        synapses = []
        for k, body in enumerate(syns_in):
            sw = f"synapses[{k}]"
            if not isinstance(body, Mapping) or "layers" not in body:
                raise SpecError(f"{sw}: a mapping with 'layers' (and {list(_SYNAPSE_KEYS[1:])}), got {body!r}")
            bad = [k2 for k2 in body if k2 not in _SYNAPSE_KEYS]
            if bad:
                raise SpecError(f"{sw}: unknown key(s) {bad}; a synapse has {list(_SYNAPSE_KEYS)}")
            pair = body["layers"]
            synapses.append(SynapseSpec(tuple(pair) if isinstance(pair, (list, tuple)) else pair,
                                        body.get("axis", -1), body.get("form", "untied"), body.get("bias", False),
                                        body.get("bias_fb"), body.get("affine")))
        sizes = data.get("sizes") or {}
        affines = data.get("affines") or {}
        if not isinstance(sizes, Mapping):
            raise SpecError(f"sizes: a mapping of names to sizes, got {sizes!r}")
        if not isinstance(affines, Mapping):
            raise SpecError(f"affines: a mapping of names to shapes, got {affines!r}")
        groups = data.get("groups")
        try:
            return cls(layers, synapses, visible=data.get("visible", "v"),
                       splitting=data.get("splitting", "parallel"),
                       groups=[list(g) for g in groups] if isinstance(groups, list) and
                       all(isinstance(g, list) for g in groups) else groups,
                       sizes=dict(sizes), affines={k: tuple(v) if isinstance(v, list) else v
                                                   for k, v in affines.items()},
                       kind=data.get("kind"))
        except SpecError as e:
            raise SpecError(f"{where}: {e}") from None

    @classmethod
    def from_network(cls, net: Network, visible: str = "v", splitting: str = "parallel",
                     groups: list[list[str]] | None = None) -> NetworkSpec:
        """The spec of a network built in Python, with its sizes as fixed integers (it then fits only models of
        the tokens x channels its visible layer has)."""
        affines: dict[int, tuple[str, tuple]] = {}
        layers = {n: LayerSpec(tuple(L.shape), lag.to_spec(L.lagrangian), L.tau) for n, L in net.layers.items()}
        synapses = []
        for k, syn in enumerate(net.synapses):
            if not isinstance(syn, DenseSynapse):
                raise SpecError(f"synapses[{k}]: a {type(syn).__name__} has no spec form (DenseSynapse only)")
            aff = None
            if syn.affine is not None:
                key = id(syn.affine)
                if key not in affines:
                    affines[key] = (f"affine{len(affines)}", tuple(syn.affine.weight.shape))
                aff = affines[key][0]
            synapses.append(SynapseSpec(syn.layers, syn.axis, syn.form, syn.has_bias, syn.has_bias_fb, aff))
        return cls(layers, synapses, visible=visible, splitting=splitting, groups=groups,
                   affines=dict(affines.values()))


_REGISTRY: dict[str, NetworkSpec] = {}


def register_spec(name: str, spec) -> NetworkSpec:
    """Give a spec built in Python a name that ``load_spec`` (and so ``model_kwargs.spec`` of a training config)
    accepts; a module that calls it is loaded with ``experiments.train --import module``. A run stores the spec
    itself, not the name, so it rebuilds without the module."""
    if not isinstance(name, str) or not name:
        raise SpecError(f"register_spec: a name is a non-empty string, got {name!r}")
    spec = load_spec(spec)
    _REGISTRY[name] = spec
    return spec


def registered_specs() -> list[str]:
    return sorted(_REGISTRY)


def load_spec(spec) -> NetworkSpec:
    """A spec from a ``NetworkSpec``, plain data, a name given to ``register_spec``, or a YAML file's path;
    SpecError naming the file or the name."""
    if isinstance(spec, NetworkSpec):
        return spec
    if isinstance(spec, str) and spec in _REGISTRY:
        return _REGISTRY[spec]
    if isinstance(spec, (str, Path)):
        p = Path(spec)
        if not p.is_file():
            known = f"; registered specs: {registered_specs()}" if _REGISTRY else ""
            raise SpecError(f"network spec {str(p)!r} is neither a file nor a registered name (register_spec, "
                            f"loaded with --import){known}")
        try:
            data = yamlio.load_file(p)
        except yaml.YAMLError as e:
            raise SpecError(f"network spec file {str(p)!r} is not valid YAML: {e}") from None
        return NetworkSpec.from_dict(data, where=f"network spec file {str(p)!r}")
    if isinstance(spec, Mapping):
        return NetworkSpec.from_dict(spec)
    raise SpecError(f"a network spec is a NetworkSpec, a mapping or a YAML file's path, got {type(spec).__name__}")

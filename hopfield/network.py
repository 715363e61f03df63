"""A hierarchical Hopfield network: named layers, synapses between them, one energy, its dynamics.

State: a dict layer name -> tensor (batch, *layer.shape). Equations (Krotov 2021):

    g_A = dL_A/dx_A                                                        (Eq. 16)
    E   = sum_A [<x_A, g_A> - L_A(x_A)] + sum_s E_s(g) - sum_A <I_A, g_A>   (Eq. 17, with inputs I)
    tau_A dx_A/dt = -dE/dg_A = sum_s (-dE_s/dg_A) + I_A - x_A              (Eq. 14)
    dE/dt = -sum_A tau_A xdot_A^T Hess(L_A) xdot_A  <= 0                    (Eq. 18)

Eq. 18 holds when every synapse is symmetric and every Lagrangian convex; a clamped layer is held fixed
(xdot_A = 0) and drops out of the sum.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .layers import Layer
from .synapses import Synapse

__all__ = ["Network"]

State = dict[str, Tensor]


class Network(nn.Module):
    """Layers (a dict name -> Layer, or (name, Layer) pairs) coupled by synapses, with one energy."""

    def __init__(self, layers: Mapping[str, Layer] | Sequence[tuple[str, Layer]], synapses: Sequence[Synapse]):
        super().__init__()
        items = list(layers.items()) if isinstance(layers, Mapping) else list(layers)
        self.layers: dict[str, Layer] = {}
        for item in items:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise TypeError(f"layers must be a dict or (name, Layer) pairs, got item {item!r}")
            name, layer = item
            if not isinstance(name, str) or not name:
                raise ValueError(f"layer names must be non-empty strings, got {name!r}")
            if name in self.layers:
                raise ValueError(f"duplicate layer name {name!r}")
            if not isinstance(layer, Layer):
                raise TypeError(f"layer {name!r} must be a hopfield.Layer, got {type(layer).__name__}")
            self.layers[name] = layer
        if not self.layers:
            raise ValueError("a Network needs at least one layer")
        self.synapses = nn.ModuleList()
        seen = set()
        for syn in synapses:
            if not isinstance(syn, Synapse):
                raise TypeError(f"synapses must be hopfield Synapse modules, got {type(syn).__name__}")
            unknown = [n for n in syn.layers if n not in self.layers]
            if unknown:
                raise ValueError(
                    f"synapse {syn.name!r} refers to unknown layer {unknown[0]!r}; layers are {list(self.layers)}"
                )
            if id(syn) in seen:
                raise ValueError(f"synapse {syn.name!r} is listed twice")
            seen.add(id(syn))
            syn.bind({n: self.layers[n] for n in syn.layers})
            self.synapses.append(syn)

    def extra_repr(self) -> str:
        rows = [f"({n}): Layer(shape={l.shape}, lagrangian={l.lagrangian}, tau={l.tau:g})"
                for n, l in self.layers.items()]
        return "\n".join(rows)

    # ------------------------------------------------------------------ states
    def init_state(self, batch: int, *, scale: float = 1.0, generator: torch.Generator | None = None,
                   dtype: torch.dtype | None = None, device=None) -> State:
        """Random state: ``scale`` * N(0, 1) per layer (zeros when scale == 0), on the network's dtype/device."""
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"init_state: dtype is a floating torch.dtype (torch.float64, ...), got {dtype!r}")
        p = next(self.parameters(), None)
        dtype = dtype or (p.dtype if p is not None else torch.get_default_dtype())
        device = device or (p.device if p is not None else None)
        return {n: l.init(batch, scale=scale, generator=generator, dtype=dtype, device=device)
                for n, l in self.layers.items()}

    def _reference(self) -> Tensor | None:
        """The first floating-point parameter: states and inputs must share its dtype and device."""
        return next((p for p in self.parameters() if p.is_floating_point()), None)

    def check_state(self, state: Mapping[str, Tensor]) -> None:
        """Raise a clear error if ``state`` does not match the layers (names, shapes, one batch size) or the
        network's dtype and device (those of its parameters; of the first layer's state if it has none)."""
        if not isinstance(state, Mapping):
            raise TypeError(f"a state is a dict layer name -> tensor, got {type(state).__name__}")
        missing = [n for n in self.layers if n not in state]
        extra = [n for n in state if n not in self.layers]
        if missing or extra:
            raise ValueError(f"state does not match the layers: missing {missing}, unknown {extra}")
        batch = None
        for n, layer in self.layers.items():
            x = state[n]
            if not isinstance(x, Tensor) or x.shape[1:] != layer.shape or x.ndim != len(layer.shape) + 1:
                got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"state of layer {n!r} must have shape (batch, *{layer.shape}), got {got}")
            if batch is None:
                batch = x.shape[0]
            elif x.shape[0] != batch:
                raise ValueError(f"state of layer {n!r} has batch size {x.shape[0]}, other layers {batch}")
        ref = self._reference()
        ref = state[next(iter(self.layers))] if ref is None else ref
        for n in self.layers:
            self._check_like(state[n], ref, f"state of layer {n!r}")

    def check_parameters(self, where: str) -> None:
        """ValueError naming the synapse and parameter that holds a NaN or an infinity: a solver would otherwise
        report the state blowing up, or a fixed point not found, and point at the dynamics instead."""
        for syn in self.synapses:
            for pname, param in syn.named_parameters():
                if not bool(torch.isfinite(param).all()):
                    raise ValueError(f"{where}: the parameter {pname!r} of synapse {syn.name!r} is not finite "
                                     "(NaN or inf)")

    def check_tensor(self, x: Tensor, what: str) -> None:
        """``x`` is floating-point, on the network's dtype and device (those of its parameters; anything if it has
        none): otherwise an error naming ``what`` and the conversion to make."""
        ref = self._reference()
        if ref is not None:
            self._check_like(x, ref, what)

    @staticmethod
    def _check_like(x: Tensor, ref: Tensor, what: str) -> None:
        """``x`` (a state or an input) is floating-point, with the dtype and device of ``ref``."""
        if not x.is_floating_point():
            raise TypeError(f"{what} must be a floating-point tensor, got {x.dtype}")
        if x.dtype != ref.dtype or x.device != ref.device:
            raise ValueError(
                f"{what} is {x.dtype} on {x.device}, but the network computes in {ref.dtype} on {ref.device}: "
                f"convert it with .to(dtype={ref.dtype}, device={str(ref.device)!r}) or the network with net.to(...)")

    def _check_inputs(self, inputs: Mapping[str, Tensor] | None, clamped: Iterable[str],
                      state: Mapping[str, Tensor]) -> tuple[dict, tuple]:
        """Inputs I_A of Eq. 14: known layers, each broadcastable to its (checked) state's (batch, *shape)."""
        inputs = dict(inputs or {})
        for n, cur in inputs.items():
            if n not in self.layers:
                raise ValueError(f"input current for unknown layer {n!r}; layers are {list(self.layers)}")
            if not isinstance(cur, Tensor):
                raise TypeError(f"input current for layer {n!r} must be a tensor, got {type(cur).__name__}")
            want = tuple(state[n].shape)
            try:
                ok = torch.broadcast_shapes(cur.shape, want) == want
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(
                    f"input current for layer {n!r} has shape {tuple(cur.shape)}, which does not broadcast to the "
                    f"layer's state (batch, *shape) = {want}")
            self._check_like(cur, state[n], f"input current for layer {n!r}")
        clamped = (clamped,) if isinstance(clamped, str) else tuple(clamped)  # one name, or names
        for n in clamped:
            if n not in self.layers:
                raise ValueError(f"cannot clamp unknown layer {n!r}; layers are {list(self.layers)}")
        return inputs, clamped

    # ------------------------------------------------------------------ energy
    def activations(self, state: Mapping[str, Tensor]) -> State:
        """g_A = dL_A/dx_A for every layer (Eq. 16)."""
        return {n: l.activation(state[n]) for n, l in self.layers.items()}

    def currents(self, state: Mapping[str, Tensor], inputs: Mapping[str, Tensor] | None = None,
                 g: Mapping[str, Tensor] | None = None) -> State:
        """Total current into each layer: sum_s -dE_s/dg_A + I_A (zero for an isolated layer)."""
        g = self.activations(state) if g is None else g
        out: State = {}
        for syn in self.synapses:
            for n, c in syn.currents(g).items():
                out[n] = out[n] + c if n in out else c
        for n, i in (inputs or {}).items():
            out[n] = out[n] + i if n in out else i.expand_as(state[n])
        for n in self.layers:
            if n not in out:
                out[n] = torch.zeros_like(state[n])
        return out

    def energy_terms(self, state: Mapping[str, Tensor], inputs: Mapping[str, Tensor] | None = None) -> State:
        """Every term of Eq. 17 per sample: 'layer:A', 'synapse:NAME' and 'input:A', each (batch,)."""
        self.check_state(state)
        inputs, _ = self._check_inputs(inputs, (), state)
        g = self.activations(state)
        terms = {f"layer:{n}": l.energy(state[n], g[n]) for n, l in self.layers.items()}
        for i, syn in enumerate(self.synapses):
            key = f"synapse:{syn.name}"
            terms[key if key not in terms else f"{key}#{i}"] = syn.energy(g)
        for n, cur in inputs.items():
            terms[f"input:{n}"] = -(cur.expand_as(g[n]) * g[n]).reshape(g[n].shape[0], -1).sum(-1)
        return terms

    def energy(self, state: Mapping[str, Tensor], inputs: Mapping[str, Tensor] | None = None) -> Tensor:
        """Total energy per sample, shape (batch,) (Eq. 17; a pseudo-energy with asymmetric synapses).
        FloatingPointError, naming the layer or the term, when it is not finite."""
        terms = self.energy_terms(state, inputs)
        total = sum(terms.values())
        if not bool(torch.isfinite(total).all()):
            for n in self.layers:
                if not bool(torch.isfinite(state[n]).all()):
                    raise FloatingPointError(f"energy: the state of layer {n!r} is not finite (NaN or inf)")
            bad = [k for k, v in terms.items() if not bool(torch.isfinite(v).all())]
            raise FloatingPointError(f"energy: not finite although every state is: the term(s) {bad} overflowed "
                                     "(a state or weight too large for the dtype?)")
        return total

    # ------------------------------------------------------------------ dynamics
    def vector_field(self, state: Mapping[str, Tensor], inputs: Mapping[str, Tensor] | None = None,
                     clamped: Iterable[str] = ()) -> State:
        """dx_A/dt from tau_A dx_A/dt = (currents into A) - x_A (Eq. 14); zero for clamped layers."""
        self.check_state(state)
        inputs, clamped = self._check_inputs(inputs, clamped, state)
        return self._vector_field(state, inputs, clamped)

    def _vector_field(self, state, inputs, clamped) -> State:
        if not torch.is_grad_enabled():  # the buffered evaluator: each synapse's GEMM straight into dx/dt
            from .stepping import _Field

            names = list(self.layers)
            out = [torch.empty_like(state[n]) for n in names]
            _Field(self, names, inputs, clamped)([state[n] for n in names], out, 0.0)
            return dict(zip(names, out))
        cur = self.currents(state, inputs)
        return {n: (torch.zeros_like(state[n]) if n in clamped else (cur[n] - state[n]) / l.tau)
                for n, l in self.layers.items()}

    def energy_rate(self, state: Mapping[str, Tensor], inputs: Mapping[str, Tensor] | None = None,
                    clamped: Iterable[str] = ()) -> Tensor:
        """dE/dt predicted by Eq. 18, -sum_A tau_A xdot_A^T Hess(L_A) xdot_A, per sample.

        It equals the true rate of change of ``energy`` along the flow when every synapse is symmetric.
        """
        xdot = self.vector_field(state, inputs, clamped)
        rate = 0
        for n, l in self.layers.items():
            hv = l.lagrangian.hvp(state[n], xdot[n])
            rate = rate - l.tau * (xdot[n] * hv).reshape(hv.shape[0], -1).sum(-1)
        return rate

    def descent_caveats(self) -> list[str]:
        """Why energy descent (Eq. 18) is not guaranteed for this network; empty when it is."""
        out = []
        for n, l in self.layers.items():
            if not l.lagrangian.convex:
                out.append(f"layer {n!r}: " + (l.lagrangian.caveat or f"{l.lagrangian} is not convex"))
        for syn in self.synapses:
            out.extend(syn.caveats())
        return out

    @property
    def descent_guaranteed(self) -> bool:
        return not self.descent_caveats()

    def simulate(self, state: Mapping[str, Tensor], t: Tensor, **kwargs):
        """Integrate the dynamics with torchdiffeq; see ``hopfield.dynamics.simulate``."""
        from .dynamics import simulate

        return simulate(self, state, t, **kwargs)

    def relax(self, state: Mapping[str, Tensor], tol: float | None = None, **kwargs) -> State:
        """Integrate to a fixed point (max |dx/dt| < tol; by default 1e-6 in float64, 1e-3 in float32); see
        ``hopfield.dynamics.relax``."""
        from .dynamics import relax

        return relax(self, state, tol, **kwargs)

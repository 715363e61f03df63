"""Hierarchical Hopfield networks: Lagrangian layers, synapses, one energy, continuous dynamics.

    from hopfield import Layer, Network, DenseSynapse, lagrangians as lag
"""

from . import lagrangians, presets
from .attention import AttentionSynapse
from .coupling import AttentionCoupling
from .dynamics import (
    DescentReport,
    NonFiniteStateError,
    NotConvergedError,
    StepUnderflowError,
    Trajectory,
    relax,
    simulate,
)
from .layers import Layer
from .network import Network
from .synapses import Affine, DenseSynapse, Synapse

__all__ = [
    "Affine",
    "AttentionCoupling",
    "AttentionSynapse",
    "DenseSynapse",
    "DescentReport",
    "Layer",
    "Network",
    "NonFiniteStateError",
    "NotConvergedError",
    "StepUnderflowError",
    "Synapse",
    "Trajectory",
    "lagrangians",
    "presets",
    "relax",
    "simulate",
]
__version__ = "0.1.0"

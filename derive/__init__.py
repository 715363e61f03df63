"""Architecture derivation: the adiabatic and discrete-time limits of hierarchical Hopfield networks.

    from derive import adiabatic, discretize
    field = adiabatic(net)              # tau_v dv/dt = F^v(v) - alpha v, every fast layer eliminated
    block = discretize(net, n_iter=2)   # v <- v + F^v(v): an nn.Module whose parameters are net's synapses
    print(block.explain())              # the update rule it implements
"""

from .adiabatic import Branch, ReducedField, adiabatic
from .attention import (
    DerivedViT,
    DerivedViTBlock,
    euler_alpha,
    from_reference_vit,
    load_reference_vit_block,
    score_memory,
    score_tau,
    vit_block_network,
)
from .discrete import DerivedBlock, DiscreteConfig, SolveCertificate, discretize
from .models import (
    KINDS,
    DerivedMixer,
    DerivedMixerConfig,
    block_network,
    derived_block,
    from_reference,
    from_timm,
    load_reference_block,
    to_reference,
    to_timm,
)
from .registry import DERIVED_MODEL_NAMES
from .spectral import SoftSpectralNorm

__all__ = [
    "DERIVED_MODEL_NAMES",
    "KINDS",
    "Branch",
    "DerivedBlock",
    "DerivedMixer",
    "DerivedMixerConfig",
    "DerivedViT",
    "DerivedViTBlock",
    "DiscreteConfig",
    "ReducedField",
    "SoftSpectralNorm",
    "SolveCertificate",
    "adiabatic",
    "block_network",
    "derived_block",
    "discretize",
    "euler_alpha",
    "from_reference",
    "from_reference_vit",
    "from_timm",
    "load_reference_block",
    "load_reference_vit_block",
    "score_memory",
    "score_tau",
    "to_reference",
    "to_timm",
    "vit_block_network",
]

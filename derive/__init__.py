"""Architecture derivation: the adiabatic and discrete-time limits of hierarchical Hopfield networks.

    from derive import adiabatic, discretize
    field = adiabatic(net)              # tau_v dv/dt = F^v(v) - alpha v, every fast layer eliminated
    block = discretize(net, n_iter=2)   # v <- v + F^v(v): an nn.Module whose parameters are net's synapses
    print(block.explain())              # the update rule it implements
    block = spec_block("net.yaml", seq_len=49, dim=128)   # a network written down as data (derive.NetworkSpec)
"""

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
from .convert import from_reference, from_timm, load_reference_block, to_reference, to_timm
from .discrete import AxisBatchNorm, DerivedBlock, DiscreteConfig, SolveCertificate, discretize
from .fastsolve import SlowManifoldError
from .models import KINDS, DerivedMixer, DerivedMixerConfig, block_network, block_spec, derived_block, spec_block
from .reduced import Branch, ReducedField, adiabatic
from .registry import DERIVED_MODEL_NAMES, SPEC_MODEL_NAMES
from .spec import LayerSpec, NetworkSpec, SpecError, SynapseSpec, load_spec, register_spec
from .spectral import SoftSpectralNorm
from .verify import VerifyReport, verify

__all__ = [
    "DERIVED_MODEL_NAMES",
    "KINDS",
    "SPEC_MODEL_NAMES",
    "AxisBatchNorm",
    "Branch",
    "DerivedBlock",
    "DerivedMixer",
    "DerivedMixerConfig",
    "DerivedViT",
    "DerivedViTBlock",
    "DiscreteConfig",
    "LayerSpec",
    "NetworkSpec",
    "ReducedField",
    "SlowManifoldError",
    "SoftSpectralNorm",
    "SolveCertificate",
    "SpecError",
    "SynapseSpec",
    "VerifyReport",
    "adiabatic",
    "block_network",
    "block_spec",
    "derived_block",
    "discretize",
    "euler_alpha",
    "from_reference",
    "from_reference_vit",
    "from_timm",
    "load_reference_block",
    "load_reference_vit_block",
    "load_spec",
    "register_spec",
    "score_memory",
    "score_tau",
    "spec_block",
    "to_reference",
    "to_timm",
    "verify",
    "vit_block_network",
]

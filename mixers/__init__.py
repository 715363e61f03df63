"""Hand-written reference modules of the Mixer family in plain PyTorch, with timm's names.

    from mixers import MlpMixer, MixerConfig, iMlp, LiMlp
    import timm, mixers  # importing mixers registers vmixer_*, imixer_*, limixer_*, paramixer_* with timm
    model = timm.create_model("imixer_s16_224", num_classes=10, h_ratio=2)

Layers (`mixers.layers`): `Mlp`, `SpectralNormLinear`, `LinearBatchNorm`, `iMlp` (iMixer Eq. 30), `LiMlp` (iMixer
Appendix B), `SymMlp`, `AsymMlp` (parallelized Mixer). Blocks (`mixers.blocks`): `MixerBlock`, `IMixerBlock`,
`LiMixerBlock`, `ParaMixerBlock`. The model (`mixers.models`): `MixerConfig`, `MlpMixer`. Vision Transformer
(`mixers.vit`): `Attention`, `Block`, `ViTConfig`, `VisionTransformer` with standard or modern Hopfield attention
(registered as hvit_*, mhavit_*). What the models share (`mixers.backbone`): `PatchStem`, checkpointed blocks, timm's
classifier and feature API.
"""

from .backbone import PatchStem
from .blocks import IMixerBlock, LiMixerBlock, MixerBlock, ParaMixerBlock, build_token_mixer
from .layers import INNER_NORMS, AsymMlp, LiMlp, LinearBatchNorm, Mlp, SpectralNormLinear, SymMlp, iMlp
from .models import BLOCK_TYPES, MODEL_NAMES, MixerConfig, MlpMixer
from .vit import SKIP_MODES, VIT_MODEL_NAMES, Attention, Block, VisionTransformer, ViTConfig

__all__ = [
    "BLOCK_TYPES",
    "INNER_NORMS",
    "MODEL_NAMES",
    "SKIP_MODES",
    "VIT_MODEL_NAMES",
    "AsymMlp",
    "Attention",
    "Block",
    "IMixerBlock",
    "LiMixerBlock",
    "LiMlp",
    "LinearBatchNorm",
    "MixerBlock",
    "MixerConfig",
    "Mlp",
    "MlpMixer",
    "ParaMixerBlock",
    "PatchStem",
    "SpectralNormLinear",
    "SymMlp",
    "ViTConfig",
    "VisionTransformer",
    "build_token_mixer",
    "iMlp",
]

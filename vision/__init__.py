"""VLM speculative decoding with visual-token pruning in the drafter (``mmspec.vision``).

Families: LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL (HF ``from_pretrained``
checkpoints with their processors). Strategies: verifier (SpecVLM), cls (FasterVLM),
diversity (DivPrune), uniform, none.
"""

from .adapters import FAMILIES, FamilyMismatchError, NoImageError, family_of, prefill_multimodal
from .drafter import KeepRatioError, VLMDrafter
from .feature_drafter import PrunedFeatureDrafter
from .generate import generate, generate_stream
from .pruning import (ClsAttentionPruning, DiversityPruning, NoPruning, PruningError, PruningStrategy,
                      UniformPruning, VerifierGuidedPruning, get_strategy)

__all__ = [
    "ClsAttentionPruning", "DiversityPruning", "FAMILIES", "FamilyMismatchError", "KeepRatioError",
    "NoImageError", "NoPruning", "PrunedFeatureDrafter", "PruningError", "PruningStrategy", "UniformPruning", "VLMDrafter",
    "VerifierGuidedPruning", "family_of", "generate", "generate_stream", "get_strategy", "prefill_multimodal",
]

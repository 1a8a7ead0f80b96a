"""mmspec: speculative decoding for multimodal models.

Text decoding (this module): :func:`generate` / :func:`generate_stream` run lossless
speculative decoding of any HF causal LM with a drafter model, a draft tree or prompt lookup,
batched; the same loop serves :mod:`mmspec.vision` and :mod:`mmspec.image_gen`.
"""

from .config import SamplingParams
from .drafters import (BlockwiseDrafter, ConfidenceDraftLength, CostAwareDraftLength, CostModel, Draft, Drafter, DynamicTree, FeatureDrafter, FixedDraftLength, HeuristicDraftLength,
                       HybridDrafter, Lattice, ModelDrafter, NGramRescorer, NeuralRescorer, PromptLookupDrafter, StaticTree, TreeDrafter,
                       check_same_tokenizer)
from .calibration import Calibration, CalibrationError, DraftShape, calibrate
from .engine import GenerationOutput, StepEvent, generate, generate_stream
from .errors import (DeviceMismatchError, EmptyPromptError, InvalidDraftLengthError, InvalidLengthError,
                     InvalidSamplingError, MethodParameterError, MMSpecError, NonFiniteError, ShapeError,
                     TokenIdError, VocabularyMismatchError)
from .guidance import Guidance
from .rng import RowRandom
from .stats import GenerationStats
from .verify import ExactRule, GreedyRule, TreeVerifyResult, VerifyResult, verify_chain, verify_tree

__version__ = "0.1.0"

__all__ = [
    "BlockwiseDrafter", "Calibration", "CalibrationError", "DraftShape", "calibrate", "Lattice", "NGramRescorer", "NeuralRescorer", "ConfidenceDraftLength", "CostAwareDraftLength", "CostModel", "DeviceMismatchError", "FeatureDrafter", "Draft", "Drafter", "DynamicTree", "EmptyPromptError",
    "ExactRule", "FixedDraftLength", "GenerationOutput", "GenerationStats", "GreedyRule", "Guidance",
    "HeuristicDraftLength", "HybridDrafter", "InvalidDraftLengthError", "InvalidLengthError", "InvalidSamplingError",
    "MMSpecError", "MethodParameterError", "ModelDrafter", "NonFiniteError", "PromptLookupDrafter", "RowRandom",
    "SamplingParams", "ShapeError", "StaticTree", "StepEvent", "TokenIdError", "TreeDrafter",
    "TreeVerifyResult", "VerifyResult", "VocabularyMismatchError", "check_same_tokenizer", "generate",
    "generate_stream", "verify_chain", "verify_tree",
]

"""mmspec: speculative decoding for multimodal models.

Text decoding (this module): :func:`generate` / :func:`generate_stream` run lossless
speculative decoding of any HF causal LM with a drafter model or prompt lookup, batched.
"""

from .config import SamplingParams
from .drafters import (ConfidenceDraftLength, Draft, Drafter, FixedDraftLength, HeuristicDraftLength,
                       ModelDrafter, PromptLookupDrafter, check_same_tokenizer)
from .engine import GenerationOutput, StepEvent, generate, generate_stream
from .errors import (DeviceMismatchError, EmptyPromptError, InvalidDraftLengthError, InvalidLengthError,
                     InvalidSamplingError, MMSpecError, ShapeError, VocabularyMismatchError)
from .stats import GenerationStats
from .verify import ExactRule, GreedyRule, VerifyResult, verify_chain

__version__ = "0.1.0"

__all__ = [
    "ConfidenceDraftLength", "DeviceMismatchError", "Draft", "Drafter", "EmptyPromptError", "ExactRule",
    "FixedDraftLength", "GenerationOutput", "GenerationStats", "GreedyRule", "HeuristicDraftLength",
    "InvalidDraftLengthError", "InvalidLengthError", "InvalidSamplingError", "MMSpecError", "ModelDrafter",
    "PromptLookupDrafter", "SamplingParams", "ShapeError", "StepEvent", "VerifyResult",
    "VocabularyMismatchError", "check_same_tokenizer", "generate", "generate_stream", "verify_chain",
]

"""Drafters: propose tokens for the target to verify."""

from .adaptive import (ConfidenceDraftLength, CostAwareDraftLength, DraftLengthPolicy, FixedDraftLength,
                       HeuristicDraftLength)
from .base import Draft, Drafter, StepOutcome
from .blockwise import BlockwiseDrafter, Lattice
from .cost_model import CostModel, measure_cost_model
from .feature import FeatureDrafter
from .hybrid import HybridDrafter
from .lattice_rescoring import NeuralRescorer, NGramModel, NGramRescorer, Rescorer
from .model import ModelDrafter, TreeDrafter, check_same_tokenizer
from .prompt_lookup import PromptLookupDrafter
from .test_time_speculation import TTSConfig, TTSConfigError, TTSDrafter
from .tree import DynamicTree, StaticTree

__all__ = [
    "ConfidenceDraftLength", "CostAwareDraftLength", "CostModel", "Draft", "FeatureDrafter", "measure_cost_model", "DraftLengthPolicy", "Drafter", "FixedDraftLength",
    "HeuristicDraftLength", "HybridDrafter", "ModelDrafter", "StaticTree", "DynamicTree", "TreeDrafter", "check_same_tokenizer", "PromptLookupDrafter", "StepOutcome",
    "TTSConfig", "TTSConfigError", "TTSDrafter", "BlockwiseDrafter", "Lattice", "NGramModel", "NGramRescorer",
    "NeuralRescorer", "Rescorer",
]

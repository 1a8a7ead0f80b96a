"""Verification core: pure tensor functions deciding which drafted tokens to keep."""

from .chain import default_rule, verify_chain, verify_chain_probs, walk_chain
from .exact import ExactRule
from .greedy import GreedyRule
from .grouped import GroupedRule
from .latent_neighbour import LatentNeighbourRule
from .pooled_threshold import PooledThresholdRule
from .rule import AcceptRule
from .tree import (ROOT_PARENT, TreeVerifyResult, compute_depths, default_tree_rule, verify_tree, verify_tree_probs,
                   walk_tree)
from .tree_rules import (DeterministicTreeRule, GreedyTreeRule, RecursiveRejectionRule, SiblingState,
                         SpecInferTreeRule, TreeRule, WithoutReplacementTreeRule)
from .types import PLACEHOLDER_TOKEN_ID, Judgement, VerifyResult

__all__ = [
    "AcceptRule", "ExactRule", "GreedyRule", "GroupedRule", "Judgement", "LatentNeighbourRule", "PLACEHOLDER_TOKEN_ID",
    "PooledThresholdRule", "VerifyResult",
    "default_rule", "verify_chain", "verify_chain_probs", "walk_chain",
    # draft trees
    "DeterministicTreeRule", "GreedyTreeRule", "ROOT_PARENT", "RecursiveRejectionRule", "SiblingState",
    "SpecInferTreeRule", "TreeRule", "TreeVerifyResult", "WithoutReplacementTreeRule",
    "compute_depths", "default_tree_rule", "verify_tree", "verify_tree_probs", "walk_tree",
]

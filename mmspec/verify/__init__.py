"""Verification core: pure tensor functions deciding which drafted tokens to keep."""

from .chain import default_rule, verify_chain, verify_chain_probs, walk_chain
from .exact import ExactRule
from .greedy import GreedyRule
from .latent_neighbour import LatentNeighbourRule
from .pooled_threshold import PooledThresholdRule
from .rule import AcceptRule
from .types import PLACEHOLDER_TOKEN_ID, Judgement, VerifyResult

__all__ = [
    "AcceptRule", "ExactRule", "GreedyRule", "Judgement", "LatentNeighbourRule", "PLACEHOLDER_TOKEN_ID",
    "PooledThresholdRule", "VerifyResult",
    "default_rule", "verify_chain", "verify_chain_probs", "walk_chain",
]

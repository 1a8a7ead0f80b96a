"""Verification core: pure tensor functions deciding which drafted tokens to keep."""

from .chain import default_rule, verify_chain, verify_chain_probs, walk_chain
from .exact import ExactRule
from .greedy import GreedyRule
from .rule import AcceptRule
from .types import PLACEHOLDER_TOKEN_ID, Judgement, VerifyResult

__all__ = [
    "AcceptRule", "ExactRule", "GreedyRule", "Judgement", "PLACEHOLDER_TOKEN_ID", "VerifyResult",
    "default_rule", "verify_chain", "verify_chain_probs", "walk_chain",
]

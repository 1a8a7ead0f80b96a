"""Collaborative decoding (weighted ensembles, contrastive decoding) of several models, and its lossless
speculative version CoS (Fu et al., ICML 2025, arXiv 2502.01662) with a fixed proposer or alternate
proposals.

    from mmspec.collaborative import generate, WeightedEnsemble, AlternateProposals
    out = generate([general, domain], input_ids, combine=WeightedEnsemble((0.5, 0.5)),
                   proposal=AlternateProposals((2, 2)), max_new_tokens=128)
"""

from .combine import Combination, ContrastiveDecoding, WeightedEnsemble
from .generate import check_models, generate, generate_stream
from .proposals import AlternateProposals, FixedProposer, ProposalDrafter
from .session import CollaborativeSession, Lookahead

__all__ = [
    "AlternateProposals", "CollaborativeSession", "Combination", "ContrastiveDecoding", "FixedProposer",
    "Lookahead", "ProposalDrafter", "WeightedEnsemble", "check_models", "generate", "generate_stream",
]

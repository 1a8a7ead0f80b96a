"""Chain verification: walk k drafted tokens per row, stop at the first rejection.

Paper: Leviathan et al. (ICML 2023) / Chen et al. (2023) for the lossless walk; the acceptance
test itself is a pluggable :class:`~mmspec.verify.rule.AcceptRule`.

Glossary:
    num_draft   long [B]: how many of the k drafted columns of a row are real drafts (a
                prompt-lookup drafter may find fewer than k); the column at ``num_draft`` is
                then sampled from p itself, as a bonus token would be
    uniforms    float [B, k]: acceptance randomness (zeros for greedy)
    noise       float [B, V]: Exp(1) noise of the exponential race that draws the single
                sampled token of each row (ones for greedy)

Input checks (before any work): drafted ids inside ``num_draft`` must lie in ``[0, V)``
(:class:`~mmspec.errors.TokenIdError`) on every backend, while ids in the padding columns beyond
``num_draft`` never matter; :func:`verify_chain` raises :class:`~mmspec.errors.NonFiniteError` for
target logits holding NaN or +inf, or a row that is all -inf (single -inf entries are legal
masking), and for draft probabilities holding NaN or inf, in the positions a row can use
(drafted columns ``< num_draft``, target columns ``<= num_draft``). These checks are the only host
synchronisations; otherwise the functions are pure tensor code: no Python RNG, no model handles.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..config import SamplingParams
from ..errors import NonFiniteError, ShapeError
from ..sampling import draw_exponential, logits_to_probs, process_logits
from .exact import ExactRule
from .greedy import GreedyRule
from .rule import AcceptRule
from .types import PLACEHOLDER_TOKEN_ID, VerifyResult


def default_rule(sampling: SamplingParams) -> AcceptRule:
    """Greedy rule for greedy sampling, exact rejection sampling otherwise."""
    return GreedyRule() if sampling.is_greedy else ExactRule()


def walk_chain(
    accepted: torch.Tensor,  # bool [B, k]
    residual: torch.Tensor,  # float [B, k, V]
    draft_tokens: torch.Tensor,  # long [B, k]
    target_probs: torch.Tensor,  # float [B, k+1, V]
    num_draft: torch.Tensor,  # long [B]
    noise: torch.Tensor,  # float [B, V]
) -> VerifyResult:
    """Turn per-position judgements into emitted tokens (generic path for any rule)."""
    batch, k = draft_tokens.shape
    cols = torch.arange(k, device=draft_tokens.device)
    ok = accepted & (cols < num_draft.unsqueeze(1))  # [B, k]
    num_accepted = ok.long().cumprod(dim=1).sum(dim=1)  # [B]
    rejected_here = num_accepted < num_draft  # [B]: a real draft was rejected at num_accepted
    at = num_accepted.view(batch, 1, 1).expand(batch, 1, target_probs.shape[-1])
    dist_p = target_probs.gather(1, at).squeeze(1)  # [B, V]
    dist_r = residual.gather(1, at.clamp_max(max(k - 1, 0))).squeeze(1) if k > 0 else dist_p
    use_residual = rejected_here & (dist_r.amax(dim=-1) > 0)
    dist = torch.where(use_residual.unsqueeze(1), dist_r, dist_p)
    final = (dist / noise).argmax(dim=-1)  # [B]
    tokens = torch.full((batch, k + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.long, device=draft_tokens.device)
    all_cols = torch.arange(k + 1, device=draft_tokens.device)
    keep = all_cols.unsqueeze(0) < num_accepted.unsqueeze(1)  # [B, k+1]
    padded = torch.cat([draft_tokens, tokens[:, :1]], dim=1)
    tokens = torch.where(keep, padded, tokens)
    tokens.scatter_(1, num_accepted.unsqueeze(1), final.unsqueeze(1))
    return VerifyResult(num_accepted=num_accepted, tokens=tokens)


def verify_chain_probs(
    draft_tokens: torch.Tensor,  # long [B, k]
    draft_probs: torch.Tensor | None,  # float [B, k, V] | None
    target_probs: torch.Tensor,  # float [B, k+1, V]
    rule: AcceptRule,
    uniforms: torch.Tensor,  # float [B, k]
    noise: torch.Tensor,  # float [B, V]
    num_draft: torch.Tensor | None = None,  # long [B]
    *,
    backend: str | None = None,
) -> VerifyResult:
    """Verify with processed distributions and explicit randomness (deterministic).

    ``backend``: ``None`` (dispatch: Triton on CUDA for fused rules, otherwise torch),
    ``"triton"``, ``"torch"`` (the kernel's PyTorch reference) or ``"generic"`` (the
    rule's :meth:`judge` plus :func:`walk_chain`; the only option for non-fused rules).
    """
    batch, k = draft_tokens.shape
    if num_draft is None:
        num_draft = torch.full((batch,), k, dtype=torch.long, device=draft_tokens.device)
    if rule.fused_mode is not None and backend != "generic":
        from mmspec.kernels import chain_verify  # both backends check the drafted ids

        tokens, num_accepted = chain_verify(
            rule.fused_mode, draft_tokens, num_draft, draft_probs, target_probs, uniforms, noise,
            backend=backend,
        )
        return VerifyResult(num_accepted=num_accepted, tokens=tokens)
    from mmspec.kernels.chain_verify import check_draft_tokens

    # padding columns become id 0: rules gather (or index neighbour tables) by every column
    draft_tokens = check_draft_tokens(draft_tokens, num_draft, target_probs.shape[-1])
    judgement = rule.judge(draft_tokens, draft_probs, target_probs[:, :k], uniforms)
    return walk_chain(judgement.accepted, judgement.residual, draft_tokens, target_probs, num_draft, noise)


def _check_shapes(draft_tokens, draft_probs, target_logits, num_draft) -> None:
    if draft_tokens.dim() != 2 or draft_tokens.dtype != torch.long:
        raise ShapeError(f"draft_tokens must be a long tensor [B, k], got {tuple(draft_tokens.shape)} {draft_tokens.dtype}")
    batch, k = draft_tokens.shape
    if target_logits.dim() != 3 or tuple(target_logits.shape[:2]) != (batch, k + 1):
        raise ShapeError(
            f"target_logits must be [B, k+1, V] = [{batch}, {k + 1}, V], got {tuple(target_logits.shape)}"
        )
    if draft_probs is not None and tuple(draft_probs.shape) != (batch, k, target_logits.shape[-1]):
        raise ShapeError(
            f"draft_probs must be [B, k, V] = [{batch}, {k}, {target_logits.shape[-1]}], got {tuple(draft_probs.shape)}"
        )
    if num_draft is not None and tuple(num_draft.shape) != (batch,):
        raise ShapeError(f"num_draft must be [B] = [{batch}], got {tuple(num_draft.shape)}")
    for name, t in (("draft_probs", draft_probs), ("num_draft", num_draft)):
        if t is not None and t.device != target_logits.device:
            raise ShapeError(f"{name} is on {t.device} but target_logits is on {target_logits.device}")
    if draft_tokens.device != target_logits.device:
        raise ShapeError(f"draft_tokens is on {draft_tokens.device} but target_logits is on {target_logits.device}")


def _check_finite(draft_probs, target_logits, num_draft) -> None:
    """NonFiniteError for NaN / +inf / all -inf target rows and non-finite draft rows a row can use."""
    batch, k1 = target_logits.shape[:2]
    row_max = target_logits.amax(dim=-1)  # NaN if any NaN, +inf if any +inf, -inf if all -inf
    cols = torch.arange(k1, device=target_logits.device)
    nd = torch.full((batch, 1), k1 - 1, device=target_logits.device) if num_draft is None else num_draft.unsqueeze(1)
    bad_t = ~torch.isfinite(row_max) & (cols <= nd)
    flags = [bad_t.any()]
    if draft_probs is not None:  # NaN, +inf or -inf anywhere in a real draft's distribution
        bad_q = ~torch.isfinite(draft_probs.sum(dim=-1)) & (cols[: k1 - 1] < nd)
        flags.append(bad_q.any())
    found = torch.stack(flags).tolist()  # one host sync
    if found[0]:
        row, col = bad_t.nonzero()[0].tolist()
        m = float(row_max[row, col])
        what = "NaN" if m != m else ("+inf" if m > 0 else "only -inf (every token masked)")
        raise NonFiniteError(f"target_logits hold {what} at row {row}, position {col}: the target model's "
                             f"output is not usable (NaN/+inf, or every token masked)")
    if len(found) > 1 and found[1]:
        row, col = bad_q.nonzero()[0].tolist()
        raise NonFiniteError(f"draft_probs hold NaN or inf at row {row}, position {col}")


class PreparedVerification(NamedTuple):
    """What chain and tree verification share before their walks.

    target:      float [B, n+1, V]  processed target (probabilities; greedy scores when ``greedy``)
    draft_probs: float [B, n, V] | None (float32; None when greedy)
    uniforms:    float [B, n]       acceptance randomness (zeros when greedy)
    noise:       float [B, V]       Exp(1) noise of the row's one sampled token (ones when greedy)
    greedy:      bool               a lossless rule at temperature 0: use the greedy rule
    """

    target: torch.Tensor
    draft_probs: torch.Tensor | None
    uniforms: torch.Tensor
    noise: torch.Tensor
    greedy: bool


def prepare_verification(target_logits: torch.Tensor, draft_probs: torch.Tensor | None, sampling: SamplingParams,
                         lossless: bool, n: int, uniforms: torch.Tensor | None, noise: torch.Tensor | None,
                         generator: torch.Generator | None) -> PreparedVerification:
    """Process the target logits as the non-speculative sampler would and fix the randomness: the given
    ``uniforms`` [B, n] / ``noise`` [B, V], else drawn from ``generator`` (uniforms first)."""
    batch, vocab, device = target_logits.shape[0], target_logits.shape[-1], target_logits.device
    if sampling.is_greedy:
        target = process_logits(target_logits, sampling) if lossless else logits_to_probs(target_logits, sampling)
        return PreparedVerification(target, None, torch.zeros((batch, n), dtype=torch.float32, device=device),
                                    torch.ones((batch, vocab), dtype=torch.float32, device=device), lossless)
    if uniforms is None:
        uniforms = torch.rand((batch, n), dtype=torch.float32, device=device, generator=generator)
    if noise is None:
        noise = draw_exponential((batch, vocab), device=device, generator=generator)
    return PreparedVerification(logits_to_probs(target_logits, sampling),
                                None if draft_probs is None else draft_probs.to(torch.float32), uniforms, noise, False)


def _verify_greedy_torch(draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None, target_logits: torch.Tensor,
                         num_draft: torch.Tensor | None) -> VerifyResult | None:
    """Greedy chain verification with one pass of ``amax`` over the logits instead of an ``argmax`` per
    position (on CPU ``argmax`` over a 50k vocabulary costs about 12x ``amax``, and the per-position
    checks and the fused reference's small ops add up to a millisecond per step).

    Drafted x at position i is accepted iff scores[i, x] equals the position's maximum and every other id
    stays below it (the maximum of a copy with x masked out): then x is the first-index argmax. Only the
    emitted position's argmax is computed. Same float32 scores, tokens and number accepted as the fused
    reference. Returns None when the general path must decide: a drafted x tied with another id for the
    maximum (first-index rule), or any input the general path rejects (non-finite logits or draft rows,
    bad ``num_draft`` or drafted ids), so that the errors raised stay the general path's. One host
    synchronisation.
    """
    batch, k = draft_tokens.shape
    scores = target_logits.to(torch.float32)  # greedy compares the float32 scores (process_logits)
    vocab, device = scores.shape[-1], scores.device
    if k == 0:  # a plain AR step: the argmax, whose value shows NaN (argmax picks it), +inf and all -inf rows
        tokens = scores[:, 0].argmax(dim=-1, keepdim=True)  # [B, 1]
        bad = ~torch.isfinite(scores[:, 0].gather(-1, tokens)).all()
        if num_draft is not None:
            bad = bad | (num_draft != 0).any()
        if bool(bad):
            return None
        return VerifyResult(num_accepted=torch.zeros((batch,), dtype=torch.long, device=device), tokens=tokens)
    if num_draft is None:
        num_draft = torch.full((batch,), k, dtype=torch.long, device=device)
    row_max = scores.amax(dim=-1)  # [B, k+1]: NaN if any NaN, +inf if any +inf, -inf if all -inf
    cols = torch.arange(k + 1, device=device)
    nd = num_draft.unsqueeze(1)
    real = cols[:k] < nd  # [B, k]
    flags = [(~torch.isfinite(row_max) & (cols <= nd)).any(),
             ((num_draft < 0) | (num_draft > k)).any(),
             (real & ((draft_tokens < 0) | (draft_tokens >= vocab))).any()]
    x = torch.where(real, draft_tokens, torch.zeros_like(draft_tokens)).clamp(0, vocab - 1).unsqueeze(-1)
    is_max = scores[:, :k].gather(-1, x).squeeze(-1) == row_max[:, :k]  # [B, k]
    others = scores[:, :k].clone().scatter_(-1, x, float("-inf")).amax(dim=-1)  # [B, k]
    flags.append((real & is_max & (others == row_max[:, :k])).any())  # a tie: first index decides
    if draft_probs is not None:
        flags.append((~torch.isfinite(draft_probs.sum(dim=-1)) & real).any())
    if any(torch.stack(flags).tolist()):
        return None
    n = (is_max & real).long().cumprod(dim=1).sum(dim=1)  # [B]
    final = scores[torch.arange(batch, device=device), n].argmax(dim=-1)  # [B]
    padded = torch.cat([draft_tokens, draft_tokens.new_full((batch, 1), PLACEHOLDER_TOKEN_ID)], dim=1)
    tokens = torch.where(cols < n.unsqueeze(1), padded, torch.full_like(padded, PLACEHOLDER_TOKEN_ID))
    tokens = torch.where(cols == n.unsqueeze(1), final.unsqueeze(1), tokens)
    return VerifyResult(num_accepted=n, tokens=tokens)


def verify_chain(
    draft_tokens: torch.Tensor,  # long [B, k]
    draft_probs: torch.Tensor | None,  # float [B, k, V] | None (processed drafter distribution)
    target_logits: torch.Tensor,  # float [B, k+1, V] (raw target logits)
    rule: AcceptRule | None = None,
    sampling: SamplingParams = SamplingParams(),
    generator: torch.Generator | None = None,
    *,
    num_draft: torch.Tensor | None = None,  # long [B]
    backend: str | None = None,
    uniforms: torch.Tensor | None = None,  # float [B, k]
    noise: torch.Tensor | None = None,  # float [B, V]
) -> VerifyResult:
    """Verify drafted tokens against the target's logits.

    The target logits are processed with ``sampling`` exactly as HF's warpers would;
    ``draft_probs`` must already be the processed distribution the drafter sampled from
    (``None`` for deterministic drafters such as prompt lookup or greedy drafting).
    Randomness comes from ``uniforms`` and ``noise`` when given (the decoding loop passes per-row
    keyed numbers), else from ``generator``; greedy sampling uses none.
    """
    _check_shapes(draft_tokens, draft_probs, target_logits, num_draft)
    rule = rule if rule is not None else default_rule(sampling)
    if sampling.is_greedy and rule.lossless and backend is None:
        from mmspec.kernels.dispatch import select_backend

        if select_backend(target_logits.device) == "torch":  # the fused Triton kernel keeps its own walk
            fast = _verify_greedy_torch(draft_tokens, draft_probs, target_logits, num_draft)
            if fast is not None:
                return fast
    _check_finite(draft_probs, target_logits, num_draft)
    prep = prepare_verification(target_logits, draft_probs, sampling, rule.lossless, draft_tokens.shape[1],
                                uniforms, noise, generator)
    rule = GreedyRule() if prep.greedy else rule  # every lossless rule reduces to greedy at temperature 0
    draft_probs, target, uniforms, noise = prep.draft_probs, prep.target, prep.uniforms, prep.noise
    return verify_chain_probs(draft_tokens, draft_probs, target, rule, uniforms, noise, num_draft, backend=backend)

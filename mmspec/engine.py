"""The one speculative-decoding loop: text, VLMs and AR image generation (batched, lossless).

Paper: Leviathan et al. (ICML 2023); Chen et al. (2023).

Glossary:
    pending     committed tokens not yet in the target's cache (long [B, P], the same P for every
                row): the last committed token after a chain or tree step, the whole repaired
                block after a repair step; every step feeds ``[pending, d_1..d_k]``
    repair      an optional step between verification and commit (MuLo-SD's local island
                resampling, :class:`~mmspec.image_gen.mulo.LocalResampling`): it judges a block of
                drafts token by token and redraws rejected neighbourhoods; the block is then
                committed whole (no bonus token) and fed again as pending next step
    committed   tokens a row keeps from one step: accepted drafts + the recovered/bonus token,
                cut after EOS and at ``max_new_tokens``
    finished    a row that emitted EOS or reached ``max_new_tokens``; it leaves the batch
                (its cache rows are dropped from target and drafter)

    row seeds   per-row randomness (:class:`~mmspec.rng.RowRandom`): ``seed=[s_0, .., s_B-1]`` gives
                row b its own stream, so its sampled output depends only on its prompt and s_b,
                never on the other rows of the batch or their order; ``seed=s`` derives row seeds
                from (s, b); without a seed they are drawn from ``generator``

:func:`decode` is the loop (propose -> one target forward -> verify -> commit -> observe -> event).
It talks to the target only through a :class:`~mmspec.session.TargetSession` (a
:class:`~mmspec.cache.CacheSession`, a :class:`~mmspec.guidance.GuidedSession` for classifier-free guidance,
collaborative decoding's and the pipeline's sessions) and to the drafter only through the
:class:`~mmspec.drafters.base.Drafter` protocol; every entry point checks its request through
:mod:`mmspec.request`; :mod:`mmspec.vision` and :mod:`mmspec.image_gen` plug in their prefill, drafters and
guidance and reuse it.
``generate_stream`` yields one :class:`StepEvent` per verification step; ``generate``
consumes the stream.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from .cache import CacheSession
from .config import SamplingParams
from .drafters.adaptive import DraftLengthPolicy
from .drafters.base import Draft, Drafter, StepOutcome
from .guidance import Guidance, open_session
from .request import DecodeRequest, eos_set, prepare_drafter, prepare_request
from .rng import ACCEPT, EMIT, RowRandom, tree_accept_keys
from .session import TargetSession
from .stats import GenerationStats
from .verify.chain import default_rule, verify_chain
from .verify.rule import AcceptRule
from .verify.tree import compute_depths, default_tree_rule, verify_tree
from .verify.types import PLACEHOLDER_TOKEN_ID, VerifyResult

DEFAULT_NUM_DRAFT_TOKENS = 5

#: prefill(session, input_ids, attention_mask, model_inputs): feed all prompt tokens but the last
PrefillFn = Callable[[CacheSession, torch.Tensor, torch.Tensor, dict], None]


def prefill_causal_lm(session: CacheSession, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      model_inputs: dict) -> None:
    """Default target prefill: every prompt token but the last (which stays pending)."""
    if input_ids.shape[1] > 1:
        session.extend(input_ids[:, :-1], attention_mask[:, :-1], num_logits=1, **model_inputs)


@dataclass(frozen=True)
class StepEvent:
    """One verification step.

    rows:         original batch indices of the rows verified in this step
    tokens:       per row, the committed tokens; the first ``num_accepted`` came from the
                  drafter, the last one from the target (unless cut by EOS / max length)
    num_accepted: per row, accepted drafted tokens
    num_draft:    per row, drafted tokens
    finished:     per row, whether it finished in this step
    stats:        the live statistics of the whole call
    kept:         per row and committed token, whether it is a drafted token that was kept (None:
                  the first ``num_accepted``, as for chains and trees; a repair step keeps any subset)
    """

    step: int
    rows: list[int]
    tokens: list[list[int]]
    num_accepted: list[int]
    num_draft: list[int]
    finished: list[bool]
    stats: GenerationStats
    kept: list[list[bool]] | None = None


@dataclass(frozen=True)
class GenerationOutput:
    sequences: torch.Tensor  # long [B, L + T], like HF generate (finished rows padded)
    stats: GenerationStats
    num_generated: list[int]  # per row, generated tokens (including EOS)


def commit_row(emitted: list[int], num_accepted: int, remaining: int, eos: set[int] = frozenset()) -> tuple[list[int], bool]:
    """The tokens a row keeps from one step, and whether it finished: the emitted tokens (accepted
    drafts + recovered/bonus), cut at ``remaining`` and after the first EOS."""
    toks = emitted[: num_accepted + 1][:remaining]
    for j, t in enumerate(toks):
        if t in eos:
            return toks[: j + 1], True
    return toks, len(toks) == remaining


def generate_stream(
    target: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    drafter: Any,
    max_new_tokens: int | list[int],
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_draft_tokens: int | DraftLengthPolicy | None = DEFAULT_NUM_DRAFT_TOKENS,
    generator: torch.Generator | None = None,
    seed: int | list[int] | None = None,
    eos_token_id: int | list[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    rule: AcceptRule | None = None,
    prefill: PrefillFn | None = None,
    guidance: Guidance | None = None,
    stats: GenerationStats | None = None,
    repair: Any = None,
    admit: Callable[[int], Admission | None] | None = None,
    leave: Callable[[int], bool] | None = None,
    **model_inputs: Any,
) -> Iterator[StepEvent]:
    """Speculative decoding as a stream of :class:`StepEvent` (arguments as :func:`generate`; ``admit`` and
    ``leave``: rows joining and leaving the running batch between steps, see :func:`decode`; and
    ``max_new_tokens`` may give each row its own budget: a row leaves the batch at its own;
    ``guidance``: classifier-free guidance of the target (and of model drafters); ``repair``: a block
    repair step replacing the chain walk, e.g. MuLo-SD's local resampling).

    Input is validated eagerly (before the first ``next``).
    """
    request = prepare_request(target, input_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_k=top_k, top_p=top_p, generator=generator, seed=seed, eos_token_id=eos_token_id,
                              attention_mask=attention_mask, num_draft_tokens=num_draft_tokens)
    drafter = prepare_drafter(drafter, request, num_draft_tokens=num_draft_tokens, target=target)
    if guidance is not None and prefill is not None:
        raise ValueError("guidance and a custom prefill cannot be combined")
    return _run(target, drafter, request, rule if rule is not None else default_rule(request.sampling),
                model_inputs, prefill or prefill_causal_lm, guidance,
                stats if stats is not None else GenerationStats(), repair, admit, leave)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def needs_no_prefill(drafter: Drafter) -> bool:
    """Whether the drafter needs nothing from the target's prefill (:attr:`Drafter.needs_no_prefill`: plain AR and
    prompt lookup; never a drafter reading hidden states). The loop then feeds the prompt in its first step,
    together with the first draft, as HF's prompt lookup does: one target forward fewer than a prefill followed
    by a step, and the same tokens, positions and randomness."""
    return drafter.needs_no_prefill and not drafter.hidden_layers


def _run(target, drafter: Drafter, request: DecodeRequest, rule: AcceptRule, model_inputs: dict,
         prefill: PrefillFn, guidance: Guidance | None, stats: GenerationStats,
         repair: Any = None, admit: Any = None, leave: Any = None) -> Iterator[StepEvent]:
    """Prefill the target and the drafter, then :func:`decode` (a generator: nothing runs before ``next``).

    With the default prefill, no guidance, repair or extra model inputs and a drafter that
    :func:`needs_no_prefill`, there is no separate target prefill: the whole prompt is step 0's pending
    block (``prefill_time`` stays 0, the prompt's forward counts as target time)."""
    input_ids, attention_mask, device = request.input_ids, request.attention_mask, request.device
    prompt_in_first_step = (guidance is None and repair is None and prefill is prefill_causal_lm
                            and not model_inputs and needs_no_prefill(drafter))
    with torch.no_grad():
        t_start = time.perf_counter()
        if guidance is not None:
            session = open_session(target, input_ids, attention_mask, guidance=guidance,
                                   record_hidden=drafter.hidden_layers)
        else:
            session = CacheSession(target, input_ids.shape[0], device)
            if not prompt_in_first_step:
                session.record_hidden = drafter.hidden_layers  # a feature drafter reads the prompt's hidden states
                with drafter.target_prefill_context(target, input_ids, attention_mask):
                    prefill(session, input_ids, attention_mask, model_inputs)
                session.record_hidden = ()
        _sync(device)
        stats.prefill_time = time.perf_counter() - t_start
        t0 = time.perf_counter()
        drafter.start(input_ids, attention_mask, sampling=request.sampling, rng=request.rng, guidance=guidance,
                      **model_inputs)
        if drafter.hidden_layers:
            drafter.observe_prefill(session.last_hidden)
        _sync(device)
        stats.drafter_prefill_time = time.perf_counter() - t0
        stats.drafter_time += stats.drafter_prefill_time
        stats.extra.update(drafter.info)
    pending, pending_valid = (input_ids, attention_mask) if prompt_in_first_step else (input_ids[:, -1:], None)
    yield from decode(session, drafter, pending, max_new_tokens=request.budgets, sampling=request.sampling,
                      rule=rule, rng=request.rng, eos=request.eos, stats=stats, t_start=t_start, repair=repair,
                      pending_valid=pending_valid, admit=admit, leave=leave)


def draw_step_randomness(rng: RowRandom, sampling: SamplingParams, position: torch.Tensor, k: int, vocab: int,
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(uniforms float [B, k], noise float [B, V]) of one verification step, keyed by each row's
    first position ``position`` long [B]; (None, None) when greedy (verification uses none)."""
    if sampling.is_greedy:
        return None, None
    cols = position.unsqueeze(1) + torch.arange(k, dtype=torch.long)  # [B, k]
    return rng.uniform(ACCEPT, cols, device=device), rng.exponential(EMIT, position, vocab, device=device)


def draw_tree_randomness(rng: RowRandom, sampling: SamplingParams, position: torch.Tensor, num_nodes: int,
                         vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(uniforms float [B, N], noise float [B, V]) of one tree verification, keyed by each row's first position
    ``position`` long [B]: node i draws at :func:`~mmspec.rng.tree_accept_keys`, so rows never share numbers;
    (None, None) when greedy. FlowSpec's step-wise decisions draw the same numbers."""
    if sampling.is_greedy:
        return None, None
    return (rng.uniform(ACCEPT, tree_accept_keys(position, num_nodes), device=device),
            rng.exponential(EMIT, position, vocab, device=device))


def cap_draft(draft: Draft, caps: torch.Tensor) -> torch.Tensor:
    """long [B]: real drafts per row so that no row can accept more than ``caps[b]`` tokens (a chain:
    at most caps[b] drafts; a tree, whose nodes come in order of depth: the nodes of depth <= caps[b])."""
    if not draft.is_tree:
        return torch.minimum(draft.num_draft, caps)
    depth = compute_depths(draft.parents, draft.num_draft)  # [B, N], 0 for padding
    real = (depth > 0) & (depth <= caps.unsqueeze(1))
    shallow = real.long().cumprod(dim=1).sum(dim=1)  # the prefix of nodes within the cap
    return torch.minimum(draft.num_draft, shallow)


def _verify_tree_step(session, draft: Draft, pending: torch.Tensor, rule: AcceptRule, sampling: SamplingParams,
                      rng: RowRandom, position: torch.Tensor, device: torch.device, hidden_layers: tuple = ()):
    """One forward over [pending, tree] (4-D ancestor mask), :func:`verify_tree`, keep the accepted path."""
    if not rule.lossless:
        raise ValueError(f"draft trees are verified by lossless tree rules only; got {type(rule).__name__}")
    n = draft.k
    batch = pending.shape[0]
    node_valid = (torch.arange(n, device=device) < draft.num_draft.unsqueeze(1)).long()  # [B, N]
    par = torch.where(draft.parents >= 0, draft.parents + 1, torch.zeros_like(draft.parents))
    parents = torch.cat([torch.full((batch, 1), -1, dtype=torch.long, device=device), par], dim=1)
    valid = torch.cat([torch.ones((batch, 1), dtype=torch.long, device=device), node_valid], dim=1)
    session.begin_tree()
    logits = session.extend_tree(torch.cat([pending, draft.tokens.clamp_min(0)], dim=1), parents, valid,
                                 hidden_layers=hidden_layers)  # [B, 1+N, V]
    tree_rule = draft.tree_rule if draft.tree_rule is not None else default_tree_rule(sampling, draft.probs)
    uniforms, noise = draw_tree_randomness(rng, sampling, position, n, logits.shape[-1], device)
    result = verify_tree(draft.tokens, draft.parents, draft.probs, logits, tree_rule, sampling,
                         num_draft=draft.num_draft, uniforms=uniforms, noise=noise)
    nodes = result.accepted_nodes
    path = torch.cat([torch.zeros((batch, 1), dtype=torch.long, device=device),
                      torch.where(nodes >= 0, nodes + 1, nodes)], dim=1)
    session.keep_path(path, result.num_accepted + 1)
    return logits, result


@dataclass(frozen=True)
class Admission:
    """Rows joining a running batch between steps (continuous batching): their prompts (long [N, L], left
    padded, with their attention mask), a token budget and a seed each. They take the row indices after every
    row so far, in order."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    max_new_tokens: list[int]
    seeds: list[int]


def _admit(session: CacheSession, drafter: Drafter, rng: RowRandom, new: Admission) -> torch.Tensor:
    """Prefill ``new``'s prompts alone, merge them into ``session`` and the drafter and ``rng``; returns their
    pending tokens long [N, 1]."""
    ids, mask = new.input_ids.to(session.device), new.attention_mask.to(session.device)
    if ids.shape[1] < 2:
        raise ValueError("a row joining a running batch needs a prompt of at least two tokens")
    fresh = CacheSession(session.model, ids.shape[0], session.device)
    fresh.record_hidden = drafter.hidden_layers  # a feature drafter reads the new prompts' hidden states
    prefill_causal_lm(fresh, ids, mask, {})
    hidden = fresh.last_hidden if drafter.hidden_layers else None
    session.merge(fresh)
    drafter.add_rows(ids, mask, target_hidden=hidden)
    rng.add(new.seeds)
    return ids[:, -1:]


@torch.no_grad()
def decode(session: TargetSession, drafter: Drafter, pending: torch.Tensor, *,
           max_new_tokens: list[int], sampling: SamplingParams, rule: AcceptRule, rng: RowRandom,
           eos: set[int] = frozenset(), stats: GenerationStats | None = None,
           t_start: float | None = None, repair: Any = None,
           pending_valid: torch.Tensor | None = None,
           admit: Callable[[int], Admission | None] | None = None,
           leave: Callable[[int], bool] | None = None) -> Iterator[StepEvent]:
    """The loop. ``session`` holds every prompt token but ``pending`` (long [B, 1]); ``drafter`` is
    started; row b generates at most ``max_new_tokens[b]`` tokens; ``repair`` (optional) replaces the
    chain walk by a block repair step. Yields one event per step.

    ``pending_valid`` (long [B, P], chain steps only): ``pending`` is a whole left-padded prompt (the
    session is empty) and this its attention mask; step 0 feeds it with the first draft and computes only
    the k+1 logits it verifies.

    ``admit`` (chain and tree steps on a :class:`CacheSession`): called before every step after the first with
    the number of rows running; an :class:`Admission` it returns joins the batch (continuous batching).
    ``leave``: asked after each step's event was read, for every row still running (its index): True ends the
    row there, as if it had finished (a server's stop sequence or cancelled request frees its row)."""
    if pending_valid is not None and repair is not None:
        raise ValueError("a prompt fed in the first step (pending_valid) cannot be combined with a repair step")
    stats = stats if stats is not None else GenerationStats()
    t_start = time.perf_counter() if t_start is None else t_start
    device = pending.device
    batch = pending.shape[0]
    active = list(range(batch))  # original indices of the rows still in the batch
    generated: list[list[int]] = [[] for _ in range(batch)]
    position = torch.zeros((batch,), dtype=torch.long)  # committed tokens per active row (cpu)
    step = 0
    max_new_tokens = list(max_new_tokens)
    while active:
        if admit is not None and step > 0 and pending_valid is None and repair is None:
            new = admit(len(active))
            if new is not None and new.input_ids.shape[0]:
                t5 = time.perf_counter()
                pending = torch.cat([pending, _admit(session, drafter, rng, new)], dim=0)
                first = len(generated)
                generated += [[] for _ in new.max_new_tokens]
                max_new_tokens += list(new.max_new_tokens)
                active += list(range(first, len(generated)))
                position = torch.cat([position, torch.zeros(len(new.max_new_tokens), dtype=torch.long)])
                stats.prefill_time += time.perf_counter() - t5
        remaining = [max_new_tokens[r] - len(generated[r]) for r in active]
        t0 = time.perf_counter()
        # a chain or tree step emits one target token after its drafts; a repaired block is emitted as is
        caps = (torch.tensor(remaining, dtype=torch.long) - (0 if repair is not None else 1)).clamp_min(0)
        draft = drafter.propose(caps.to(device))
        if draft.k:  # an empty draft has nothing to cap
            num_draft = cap_draft(draft, caps.to(draft.num_draft.device))
            if not torch.equal(num_draft, draft.num_draft):
                draft = dataclasses.replace(draft, num_draft=num_draft)
        _sync(device)
        t1 = time.perf_counter()
        k = draft.k
        kept_masks = None
        held = torch.zeros((len(active),), dtype=torch.long, device=device)  # rows ending on a pending draft
        if draft.is_tree:
            if pending.shape[1] != 1:
                raise ValueError("a draft tree must follow a chain or tree step (one pending token per row)")
            logits, result = _verify_tree_step(session, draft, pending, rule, sampling, rng, position, device,
                                                  drafter.hidden_layers)
            t2 = t3 = time.perf_counter()  # one fused verification call; counted as target time
        else:
            p = pending.shape[1]
            block = torch.cat([pending, draft.tokens], dim=1)  # [B', P+k]
            if pending_valid is None:
                logits = session.extend(block, hidden_layers=drafter.hidden_layers)[:, p - 1:]  # [B', k+1, V]
            else:  # step 0 feeding the prompt: its padding stays invalid; only the k+1 verified logits
                valid = torch.cat([pending_valid, torch.ones_like(draft.tokens)], dim=1)
                logits = session.extend(block, valid, num_logits=k + 1, hidden_layers=drafter.hidden_layers)
                pending_valid = None
            _sync(device)
            t2 = time.perf_counter()
            if repair is None:
                uniforms, noise = draw_step_randomness(rng, sampling, position, k, logits.shape[-1], device)
                result = verify_chain(draft.tokens, draft.probs, logits, rule, sampling, num_draft=draft.num_draft,
                                      uniforms=uniforms, noise=noise)
                t3 = time.perf_counter()
                if draft.open_end and k:  # no target distribution after the last draft: a row accepting all
                    held = (result.num_accepted == k).long()  # [B] emits no bonus; its last draft stays pending
                    tokens = result.tokens.clone()
                    tokens[held.bool(), k] = PLACEHOLDER_TOKEN_ID
                    result = VerifyResult(num_accepted=result.num_accepted, tokens=tokens)
                if k:  # nothing was drafted: nothing to roll back
                    session.rollback(k - result.num_accepted + held)
            else:  # repair on the block's slots (the drafts), then drop them and feed the result next step
                final, kept = repair(session, draft.tokens, logits[:, :k], position, rng, last=pending[:, -1])
                session.rollback(torch.full((len(active),), k, dtype=torch.long, device=device))
                t3 = time.perf_counter()
                result = VerifyResult(num_accepted=kept.sum(dim=1), tokens=final)
                kept_masks = kept.tolist()
        n_acc = result.num_accepted.tolist()
        out = result.tokens.tolist()
        # the next step feeds the emitted token, or the whole repaired block
        pending = (result.tokens.gather(1, (result.num_accepted - held).unsqueeze(1)) if kept_masks is None
                   else result.tokens)
        held_list = held.tolist() if draft.open_end else [0] * len(active)
        committed, finished = [], []
        for i, row in enumerate(active):
            emitted = out[i] if kept_masks is not None else out[i][: n_acc[i] + 1 - held_list[i]]
            toks, done = commit_row(emitted, len(emitted) - 1, remaining[i], eos)
            generated[row].extend(toks)
            committed.append(toks)
            finished.append(done)
        num_committed = [len(c) for c in committed]
        position = position + torch.tensor(num_committed, dtype=torch.long)
        t_obs = time.perf_counter()
        drafter.observe(StepOutcome(draft=draft, result=result, committed=committed, target_logits=logits,
                                    target_hidden=session.last_hidden if drafter.hidden_layers else None))
        _sync(device)
        t4 = time.perf_counter()
        stats.drafter_time += (t1 - t0) + (t4 - t_obs)
        stats.target_time += t2 - t1
        stats.verify_time += t3 - t2
        stats.bookkeeping_time += t_obs - t3
        num_draft_list = draft.num_draft.tolist()
        stats.record(n_acc, num_draft_list, num_committed, held=sum(held_list))
        stats.target_calls = session.calls
        stats.drafter_calls = drafter.num_calls
        stats.total_time = time.perf_counter() - t_start
        yield StepEvent(step=step, rows=list(active), tokens=committed, num_accepted=n_acc,
                        num_draft=num_draft_list, finished=finished, stats=stats,
                        kept=None if kept_masks is None else [m[: len(c)] for m, c in zip(kept_masks, committed)])
        step += 1
        if leave is not None:  # rows the caller ended while it read this step (a stop sequence, a cancellation)
            finished = [f or bool(leave(row)) for f, row in zip(finished, active)]
        if any(finished):
            t5 = time.perf_counter()
            keep = [i for i, f in enumerate(finished) if not f]
            active = [active[i] for i in keep]
            if active:
                rows = torch.tensor(keep, dtype=torch.long, device=device)
                session.select_rows(rows)
                drafter.select_rows(rows)
                rng.select(rows)
                pending = pending[rows]
                position = position[rows.cpu()]
            stats.bookkeeping_time += time.perf_counter() - t5
    stats.total_time = time.perf_counter() - t_start


def generate(
    target: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    drafter: Any,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_draft_tokens: int | DraftLengthPolicy | None = DEFAULT_NUM_DRAFT_TOKENS,
    generator: torch.Generator | None = None,
    seed: int | list[int] | None = None,
    eos_token_id: int | list[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    rule: AcceptRule | None = None,
    pad_token_id: int | None = None,
    prefill: PrefillFn | None = None,
    **model_inputs: Any,
) -> GenerationOutput:
    """Speculative decoding with ``target`` verifying ``drafter``'s proposals.

    Args:
        target: any HF causal LM (``PreTrainedModel``).
        input_ids: long [B, L], left padded when rows differ in length.
        drafter: a :class:`~mmspec.drafters.Drafter`, a HF causal LM with the target's vocabulary
            (wrapped in :class:`~mmspec.drafters.ModelDrafter`) or ``"prompt_lookup"``.
        max_new_tokens: tokens to generate per row (> 0).
        temperature, top_k, top_p: sampling as HF's warpers; ``temperature=0`` is greedy.
        num_draft_tokens: k (>= 1) or a draft-length policy; used unless the drafter has its own.
        generator: draws the row seeds when ``seed`` is not given.
        seed: one int per row (row b's sampled output then depends only on its prompt and seed b,
            whatever else is in the batch), or one int for the batch (row b gets a seed mixed from
            it and b).
        eos_token_id: defaults to ``target.generation_config.eos_token_id``.
        rule: acceptance rule; default greedy (temperature 0) or exact rejection sampling.
        pad_token_id: fills finished rows; defaults to the generation config's pad, else EOS, else 0.
        prefill: how the target consumes the prompt (default: token ids; :mod:`mmspec.vision`
            supplies one for VLMs).
        **model_inputs: extra inputs for the target's prefill (and the drafter's ``start``).

    Returns:
        :class:`GenerationOutput` with ``sequences`` shaped like HF ``generate``'s output.
    """
    stream = generate_stream(
        target, input_ids, drafter=drafter, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, num_draft_tokens=num_draft_tokens, generator=generator, seed=seed,
        eos_token_id=eos_token_id, attention_mask=attention_mask, rule=rule, prefill=prefill, **model_inputs)
    return collect_output(stream, input_ids, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                          generation_config=getattr(target, "generation_config", None))


def collect_output(stream: Iterator[StepEvent], input_ids: torch.Tensor, *, pad_token_id: int | None,
                   eos_token_id: int | list[int] | None, generation_config: Any = None) -> GenerationOutput:
    """Run a step stream to the end and lay its tokens out like HF ``generate`` (finished rows padded with
    ``pad_token_id``, by default the generation config's pad, else EOS, else 0)."""
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    generated: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    stats = GenerationStats()
    for event in stream:
        stats = event.stats
        for row, toks in zip(event.rows, event.tokens):
            generated[row].extend(toks)
    if pad_token_id is None:
        pad_token_id = getattr(generation_config, "pad_token_id", None)
        if pad_token_id is None:
            eos = eos_set(eos_token_id if eos_token_id is not None
                          else getattr(generation_config, "eos_token_id", None))
            pad_token_id = min(eos) if eos else 0
    width = max(len(g) for g in generated)
    new = torch.full((len(generated), width), int(pad_token_id), dtype=torch.long)
    for b, g in enumerate(generated):
        new[b, : len(g)] = torch.tensor(g, dtype=torch.long)
    sequences = torch.cat([input_ids, new.to(input_ids.device)], dim=1)
    return GenerationOutput(sequences=sequences, stats=stats, num_generated=[len(g) for g in generated])

"""FlowSpec: continuous pipelined speculative decoding over the stages of :mod:`mmspec.pipeline`.

Paper: Sang et al., "FlowSpec: Continuous Pipelined Speculative Decoding for Efficient Distributed LLM
Inference" (arXiv 2507.02620). Rank 0 holds stage 0, the drafter and this loop; the stages are
:class:`~mmspec.pipeline.server.StageServer` s (messages: :mod:`~mmspec.pipeline.protocol`).

Glossary:
    round       one draft tree, grown and verified until a token outside it is emitted; node 0 is the root,
                the pending token (emitted last round, not yet fed to the target)
    node id     global and increasing over the whole generation (round r's ids all exceed round r - 1's), so a
                stage can drop every old node with one number
    score       the drafter's cumulative log-probability of a node's path (EAGLE-2); a child never scores above
                its parent, so nodes sorted by score are in a valid order to feed
    segment     the ``segment_size`` best-scoring nodes not sent yet; up to ``max_in_flight`` segments travel
                the stages back to back, so every stage has work while the last one's logits come back
    frontier    the deepest accepted node; when its logits arrive the loop decides among its children that were
                sent (one level of :func:`~mmspec.verify.tree.verify_tree`: greedy, or the lossless rule for
                deterministic top-k children). An accepted child becomes the frontier (its subtree may already
                be in flight); otherwise the target's token ends the round
    prune       nodes outside the frontier's subtree can no longer be accepted: rank 0 stops sending them and
                tells every stage on the side channel (``Kill``), which drops them from segments not forwarded
                yet; at the end of a round ``Commit`` keeps the accepted path in every stage's KV cache
    expansion   while segments are in flight the drafter expands the best unexpanded live nodes (top-k
                children each), so the next segment is ready when a slot frees up

Lossless: every decision is made at a node whose target logits arrived, among children fixed before the
decision (they depend on the drafter and the committed tokens only), with the rules of single-process tree
verification; rank 0 is one thread reading results in their fixed order, so the tokens do not depend on timing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import SamplingParams
from ..drafters.model import ModelDrafter
from ..drafters.tree import ranking_distribution
from ..drafters.base import Draft, StepOutcome
from ..engine import draw_tree_randomness
from ..errors import MethodParameterError
from ..request import prepare_drafter, prepare_request
from ..rng import RowRandom
from ..verify.tree import TreeVerifyResult, verify_tree
from ..verify.tree_rules import DeterministicTreeRule
from .protocol import MAX_KILL
from .run import prefill_pipeline
from .session import PipelineSession
from .transport import Transport, open_transport


@dataclass(frozen=True)
class FlowSpecConfig:
    """FlowSpec's draft-tree and streaming parameters (validated once, here)."""

    segment_size: int = 4
    max_in_flight: int | None = None  # segments travelling at once; None: one per stage
    top_k: int = 3  # children per expanded node, and nodes expanded per drafter forward
    max_nodes: int = 64  # nodes per round
    max_depth: int = 8  # tree depth below the root
    #: a segment after the first of a round goes out only if its best node's path probability (the drafter's)
    #: reaches this: on a single-threaded rank 0 every extra segment delays the next decision by its stage-0
    #: forward, which pays only when the accepted path is likely to reach it (0: always send)
    min_path_prob: float = 0.0

    def __post_init__(self) -> None:
        for name in ("segment_size", "top_k", "max_nodes", "max_depth"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise MethodParameterError(f"FlowSpecConfig.{name} must be an int >= 1, got {v!r}")
        if self.max_in_flight is not None and (not isinstance(self.max_in_flight, int) or self.max_in_flight < 1):
            raise MethodParameterError(f"FlowSpecConfig.max_in_flight must be None or an int >= 1, "
                                       f"got {self.max_in_flight!r}")
        if not isinstance(self.min_path_prob, (int, float)) or not 0.0 <= self.min_path_prob <= 1.0:
            raise MethodParameterError(f"FlowSpecConfig.min_path_prob must be in [0, 1], got {self.min_path_prob!r}")
        if self.max_nodes > MAX_KILL:
            raise MethodParameterError(f"FlowSpecConfig.max_nodes must be <= {MAX_KILL}, got {self.max_nodes}")


@dataclass
class FlowSpecStats:
    """What a FlowSpec generation did (rank 0's view, plus the stages' counters when collected)."""

    rounds: int = 0
    segments: int = 0
    nodes_sent: int = 0
    nodes_drafted: int = 0
    accepted_tokens: int = 0  # drafted tokens the target accepted
    emitted_tokens: int = 0
    killed_in_flight: int = 0  # sent nodes rank 0 pruned before their logits came back
    drafter_forwards: int = 0
    seconds: float = 0.0
    time_split: dict[str, float] = field(default_factory=lambda: {"draft": 0.0, "stage0": 0.0, "verify": 0.0,
                                                                   "wait": 0.0})
    #: per stage 1 .. N-1: forwards, busy s, wall s, tokens computed, tokens pruned in flight (dropped unseen)
    stages: list[list[float]] = field(default_factory=list)

    @property
    def tokens_per_round(self) -> float:
        return self.emitted_tokens / max(1, self.rounds)

    @property
    def pruned_in_flight(self) -> int:
        """Tokens the later stages dropped from queued segments because rank 0 had pruned them."""
        return int(sum(s[4] for s in self.stages))


@dataclass
class FlowSpecOutput:
    sequences: torch.Tensor  # long [1, L + T]
    stats: FlowSpecStats
    num_generated: list[int]


class _Tree:
    """One round's draft tree (batch 1, Python lists: at most ``max_nodes`` nodes)."""

    def __init__(self, first_id: int, root_token: int):
        self.first_id = first_id
        self.token, self.parent, self.depth, self.score = [root_token], [-1], [0], [0.0]
        self.dslot, self.s0 = [-1], [-1]  # the drafter's tree slot / stage 0's tree index (-1: none)
        self.sent, self.expanded, self.alive = [False], [True], [True]
        self.children: list[list[int]] = [[]]
        self.logits: dict[int, torch.Tensor] = {}
        self.feats: dict[int, dict[int, torch.Tensor]] = {}  # node -> the target's hidden states (feature drafters)

    def __len__(self) -> int:
        return len(self.token)

    def add(self, token: int, parent: int, score: float) -> None:
        self.token.append(token)
        self.parent.append(parent)
        self.depth.append(self.depth[parent] + 1)
        self.score.append(score)
        for lst, v in ((self.dslot, -1), (self.s0, -1), (self.sent, False), (self.expanded, False),
                       (self.alive, True)):
            lst.append(v)
        self.children.append([])
        self.children[parent].append(len(self.token) - 1)

    def subtree(self, node: int) -> set[int]:
        out, todo = set(), [node]
        while todo:
            i = todo.pop()
            out.add(i)
            todo.extend(self.children[i])
        return out


class FlowSpecRunner:
    """Rank 0's FlowSpec loop over a :class:`PipelineSession` (see the module glossary)."""

    first_free_id = 0  # process-wide: the next generation's first node id

    def __init__(self, session: PipelineSession, drafter: ModelDrafter, config: FlowSpecConfig,
                 sampling: SamplingParams, rng: RowRandom, eos: set[int], max_new_tokens: int):
        self.s, self.d, self.cfg = session, drafter, config
        self.sampling, self.rng, self.eos = sampling, rng, eos
        self.budget = max_new_tokens
        self.max_in_flight = config.max_in_flight or session.world
        self.log_min_prob = math.log(config.min_path_prob) if config.min_path_prob > 0 else -math.inf
        self.rule = DeterministicTreeRule()  # top-k children are a deterministic function of the context
        self.stats = FlowSpecStats()
        self.out: list[int] = []
        self.in_flight = 0
        self.next_id = FlowSpecRunner.first_free_id  # ids keep increasing across generations (stages only raise
        # their dead-below mark)
        self.done = False

    # -- timing -------------------------------------------------------------------------------------------
    def _timed(self, key: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.stats.time_split[key] += time.perf_counter() - t0

    # -- the tree -----------------------------------------------------------------------------------------
    def _add_children(self, parent: int, logits: torch.Tensor) -> None:
        """Top-k children of ``parent`` from the drafter's logits [V'] (as many as fit in max_nodes)."""
        t = self.tree
        room = self.cfg.max_nodes - len(t)
        if room <= 0:
            return
        dist = ranking_distribution(self.d, logits.unsqueeze(0))[0]
        top = dist.topk(min(self.cfg.top_k, dist.shape[-1], room))
        toks = self.d.to_target_ids(top.indices.unsqueeze(0))[0].tolist()
        for tok, p in zip(toks, top.values.double().clamp_min(1e-300).log().tolist()):
            t.add(int(tok), parent, t.score[parent] + p)
        self.stats.nodes_drafted += len(toks)

    def start_round(self, root_token: int) -> None:
        self.tree = _Tree(self.next_id, root_token)
        self.fed = 0  # drafter tree slots this round
        self.s0_count = 0
        self.path = [0]
        self.frontier = 0
        self.s.local.begin_tree()
        self.stats.rounds += 1
        logits = self._timed("draft", self.d.tree_root_logits)[0]  # feeds the drafter's pending tokens
        self.stats.drafter_forwards += 1
        self.d.session.begin_tree()
        self._add_children(0, logits)

    def expand(self) -> bool:
        """One drafter forward over the best unexpanded live nodes; False when nothing can grow."""
        t = self.tree
        if len(t) >= self.cfg.max_nodes:
            return False
        cand = [i for i in range(1, len(t)) if t.alive[i] and not t.expanded[i] and t.depth[i] < self.cfg.max_depth]
        if not cand:
            return False
        cand.sort(key=lambda i: (-t.score[i], i))
        pick = sorted(cand[: self.cfg.top_k])
        tokens = torch.tensor([[t.token[i] for i in pick]], device=self.s.device)
        par = torch.tensor([[t.dslot[t.parent[i]] if t.parent[i] > 0 else -1 for i in pick]], device=self.s.device)
        logits = self._timed("draft", self.d.tree_expand, tokens, par)[0]  # [F, V']
        self.stats.drafter_forwards += 1
        for m, i in enumerate(pick):
            t.dslot[i], t.expanded[i] = self.fed + m, True
        self.fed += len(pick)
        for m, i in enumerate(pick):
            self._add_children(i, logits[m])
        return True

    def next_segment(self) -> list[int]:
        t = self.tree
        cand = [i for i in range(len(t)) if t.alive[i] and not t.sent[i]]
        cand.sort(key=lambda i: (-t.score[i], i))  # a parent always precedes its children here
        return sorted(cand[: self.cfg.segment_size])

    def send(self, seg: list[int]) -> None:
        t = self.tree
        for m, i in enumerate(seg):  # stage 0's tree indices first: a parent may be in the same segment
            t.s0[i], t.sent[i] = self.s0_count + m, True
        self.s0_count += len(seg)
        tokens = torch.tensor([[t.token[i] for i in seg]], device=self.s.device)
        local = torch.tensor([[t.s0[t.parent[i]] if t.parent[i] >= 0 else -1 for i in seg]], device=self.s.device)
        gids = [t.first_id + i for i in seg]
        pids = [t.first_id + t.parent[i] if t.parent[i] >= 0 else -1 for i in seg]
        self._timed("stage0", self.s.send_segment, gids, pids, tokens, local)
        self.in_flight += 1
        self.stats.segments += 1
        self.stats.nodes_sent += len(seg)

    def fill(self) -> None:
        """Send segments while the pipeline has room, then grow the tree for the next one."""
        while self.in_flight < self.max_in_flight:
            seg = self.next_segment()
            if not seg:
                if not self.expand():
                    break
                continue
            if self.in_flight and max(self.tree.score[i] for i in seg) < self.log_min_prob:
                break  # not likely enough to be reached: keep rank 0 free for the next decision
            self.send(seg)
        t = self.tree
        while sum(1 for i in range(len(t)) if t.alive[i] and not t.sent[i]) < self.cfg.segment_size and self.expand():
            pass

    def receive(self) -> None:
        ids, logits, feats = self._timed("wait", self.s.receive_segment)
        self.in_flight -= 1
        t = self.tree
        for j, gid in enumerate(ids):
            i = gid - t.first_id
            if 0 <= i < len(t) and t.alive[i]:
                t.logits[i] = logits[0, j]
                if feats is not None:
                    t.feats[i] = {layer: h[0, j] for layer, h in feats.items()}

    # -- verification -------------------------------------------------------------------------------------
    def decide(self, node: int) -> tuple[int | None, int]:
        """(accepted child or None, emitted token) at ``node``, whose logits arrived."""
        t = self.tree
        kids = [c for c in t.children[node] if t.sent[c] and t.alive[c]]
        n = len(kids)
        tokens = torch.tensor([[t.token[c] for c in kids] or [0]], device=self.s.device)
        parents = torch.full_like(tokens, -1)
        logits = t.logits[node]
        target = logits.view(1, 1, -1).expand(1, tokens.shape[1] + 1, -1)  # children's rows are never read
        position = torch.tensor([len(self.out)], dtype=torch.long)  # the one loop's key for a tree at this step
        uniforms, noise = draw_tree_randomness(self.rng, self.sampling, position, tokens.shape[1], logits.shape[-1],
                                               self.s.device)
        res = verify_tree(tokens, parents, None, target, self.rule, self.sampling,
                          num_draft=torch.tensor([n], device=self.s.device), uniforms=uniforms, noise=noise)
        tok = int(res.tokens[0, 0])
        if int(res.num_accepted[0]) == 1:
            return kids[int(res.accepted_nodes[0, 0])], tok
        return None, tok

    def emit(self, token: int) -> None:
        self.out.append(token)
        self.stats.emitted_tokens += 1
        if token in self.eos or len(self.out) >= self.budget:
            self.done = True

    def prune_outside(self, node: int) -> None:
        """Kill every live node outside ``node``'s subtree (the accepted path is already decided)."""
        t = self.tree
        keep = t.subtree(node) | set(self.path)
        dead = [i for i in range(len(t)) if t.alive[i] and i not in keep]
        for i in dead:
            t.alive[i] = False
        in_flight = [t.first_id + i for i in dead if t.sent[i] and i not in t.logits]
        self.stats.killed_in_flight += len(in_flight)
        if in_flight:
            self.s.kill(t.first_id, in_flight)

    def walk(self) -> None:
        t = self.tree
        while not self.done and self.frontier in t.logits:
            child, tok = self._timed("verify", self.decide, self.frontier)
            self.emit(tok)
            if child is not None:
                self.stats.accepted_tokens += 1
                self.path.append(child)
                self.frontier = child
                if not self.done:
                    self._timed("verify", self.prune_outside, child)
                continue
            if not self.done:
                self.end_round(tok)
            return

    def end_round(self, bonus: int) -> None:
        t = self.tree
        self.next_id = t.first_id + len(t)
        in_flight = sum(1 for i in range(len(t)) if t.alive[i] and t.sent[i] and i not in t.logits)
        self.stats.killed_in_flight += in_flight
        self.s.kill(self.next_id, [])  # all of this round but the path (which every stage already holds)
        path_local = torch.tensor([[t.s0[i] for i in self.path]], device=self.s.device)
        self._timed("stage0", self.s.commit, [t.first_id + i for i in self.path], path_local)
        self._timed("draft", self.d.observe, self.outcome(bonus))
        self.start_round(bonus)

    def outcome(self, bonus: int) -> StepOutcome:
        """The round as the loop would report a verified tree step (node j of the draft = tree node j + 1; the
        root is the pending token), so the drafter observes it as usual."""
        t = self.tree
        dev = self.s.device
        acc = [i - 1 for i in self.path[1:]]
        committed = [t.token[i] for i in self.path[1:]] + [bonus]
        n = len(t) - 1
        draft = Draft(tokens=torch.tensor([t.token[1:]], dtype=torch.long, device=dev).view(1, n), probs=None,
                      num_draft=torch.tensor([n], device=dev),
                      parents=torch.tensor([[p - 1 for p in t.parent[1:]]], dtype=torch.long, device=dev).view(1, n))
        result = TreeVerifyResult(num_accepted=torch.tensor([len(acc)], device=dev),
                                  tokens=torch.tensor([committed], device=dev),
                                  accepted_nodes=torch.tensor([acc], dtype=torch.long, device=dev).view(1, -1))
        self.d._tree_slot = torch.tensor([t.dslot[1:]], dtype=torch.long, device=dev).view(1, n)  # model drafters
        hidden = None
        if self.d.hidden_layers:  # the target's hidden states at [root, nodes] (only the path's are read)
            like = next(iter(t.feats[0].values()))
            hidden = {layer: torch.stack([t.feats[i][layer] if i in t.feats else torch.zeros_like(like)
                                          for i in range(len(t))]).unsqueeze(0) for layer in t.feats[0]}
        return StepOutcome(draft=draft, result=result, committed=[committed], target_hidden=hidden)

    def run(self, pending: int) -> list[int]:
        t0 = time.perf_counter()
        self.start_round(pending)
        while not self.done:
            self.fill()
            if self.in_flight == 0:
                raise RuntimeError("FlowSpec: nothing in flight and the frontier has no logits (a bug)")
            self.receive()
            self.walk()
        self.next_id = self.tree.first_id + len(self.tree)
        FlowSpecRunner.first_free_id = self.next_id
        self.s.kill(self.next_id, [])
        while self.in_flight:  # drain: the stages skip what they have not started
            self.receive()
        self.stats.seconds = time.perf_counter() - t0
        return self.out


def check_drafter(drafter: Any) -> ModelDrafter:
    """FlowSpec drafts with the tree hooks of a model drafter (a small LM) or a feature drafter (an EAGLE head,
    which reads the target's hidden states: the stages return them with the logits)."""
    if not isinstance(drafter, ModelDrafter):
        raise MethodParameterError(f"FlowSpec needs a draft model or an EAGLE head (nn.Module, ModelDrafter or "
                                   f"FeatureDrafter), got {type(drafter).__name__}")
    return drafter


@torch.no_grad()
def generate(stage_model: torch.nn.Module, input_ids: torch.Tensor, *, vocab_size: int, world_size: int = 1,
             transport: Transport | None = None, drafter: Any, config: FlowSpecConfig = FlowSpecConfig(), max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, eos_token_id: int | list[int] | None = None,
             attention_mask: torch.Tensor | None = None, collect_stage_stats: bool = False) -> FlowSpecOutput:
    """Rank 0: FlowSpec over the pipelined target (batch 1). ``drafter``: a draft model or
    :class:`~mmspec.drafters.model.ModelDrafter`; the stages as in :func:`mmspec.pipeline.run.generate`; the other
    arguments as :func:`mmspec.generate`."""
    if not isinstance(config, FlowSpecConfig):
        raise MethodParameterError(f"config must be a FlowSpecConfig, got {type(config).__name__}")
    request = prepare_request(stage_model, input_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos_token_id,
                              attention_mask=attention_mask, num_draft_tokens=1, vocab_size=None)
    if request.batch_size != 1:
        raise MethodParameterError(f"FlowSpec decodes one sequence at a time (batch 1), got batch {request.batch_size}")
    drafter = check_drafter(prepare_drafter(drafter, request, num_draft_tokens=1))
    session = PipelineSession(stage_model, 1, request.device, vocab_size=vocab_size,
                              transport=open_transport(world_size, transport))
    input_ids = request.input_ids
    prefill_pipeline(session, drafter, input_ids, request.attention_mask, request.sampling, request.rng)
    runner = FlowSpecRunner(session, drafter, config, request.sampling, request.rng, request.eos, max_new_tokens)
    out = runner.run(int(input_ids[0, -1]))
    if collect_stage_stats:
        runner.stats.stages = session.stage_stats()
    session.close()
    seq = torch.cat([input_ids, torch.tensor([out], dtype=torch.long, device=input_ids.device)], dim=1)
    return FlowSpecOutput(sequences=seq, stats=runner.stats, num_generated=[len(out)])


__all__ = ["FlowSpecConfig", "FlowSpecOutput", "FlowSpecRunner", "FlowSpecStats", "check_drafter", "generate"]

"""Training blockwise parallel heads on self-distillation data: head i learns the target's own distribution i
positions ahead, from the target's final hidden state.

Papers: Stern et al., "Blockwise Parallel Decoding" (NeurIPS 2018); Kim et al. (arXiv 2404.09221); Medusa-2's
self-distillation loss (Cai et al., ICML 2024: the target's distribution as the soft label).

Glossary:
    position t   a token of an example with its final hidden F[t] (``example["final"]``); head i reads F[t]
                 and predicts token t + 1 + i, whose distribution under the target is softmax(F[t + i] W^T)
                 (W: the LM-head rows of the draft vocabulary)
    teacher      that distribution, kept sparse: its ``teacher_top`` most likely draft tokens, renormalised,
                 computed once for every position before training (one pass of the LM head)
    scored       head i at t is scored when t + 1 + i is an answer token of the same example
    accuracy     per head, how often its top token is the teacher's top token: the chance a chain of one
                 head's guesses survives greedy verification at that depth, given a correct prefix
    run dir      ``out/train_state.pt`` (the loop's checkpoint: heads + optimiser + step, and the heads' config
                 and draft-vocabulary coverage) while training, re-running continues; the finished heads are
                 ``out/blockwise.safetensors`` + ``out/blockwise_config.json``, and ``out/corpus.safetensors``
                 keeps the training answers' tokens (local text for n-gram rescoring)
    loop         :func:`mmspec.distill.loop.train_loop` with ``BlockwiseTraining.loop``: warm-up + cosine to
                 10 %, AdamW betas (0.9, 0.95) without weight decay, gradient norm clipped to 1, a save every
                 50 steps; a step scores ``positions_per_step`` positions drawn from (seed, step)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file

from ..drafters.lattice_rescoring import SEPARATOR, NGramModel
from ..heads.blockwise import BlockwiseConfig, BlockwiseHeads
from .data import split_off_heldout
from .loop import LoopConfig, read_checkpoint, step_seed, train_loop
from .train_head import draft_vocabulary

CORPUS_NAME = "corpus.safetensors"


@dataclass(frozen=True)
class BlockwiseTraining:
    num_heads: int = 4
    num_layers: int = 1
    draft_vocab_size: int = 4096
    teacher_top: int = 8
    positions_per_step: int = 512
    seed: int = 0
    loop: LoopConfig = LoopConfig(steps=1500, lr=1e-3, warmup=20, schedule="cosine", betas=(0.9, 0.95),
                                  weight_decay=0.0, clip_norm=1.0, save_every=50)


class FlatData(NamedTuple):
    final: torch.Tensor  # float16 or bfloat16 [T, d]: every example's final hidden states, concatenated (in the
    # examples' own 16-bit type: float16 data stays float16, anything else is kept as bfloat16, which cannot overflow)
    answer: torch.Tensor  # bool [T]: answer tokens
    last: torch.Tensor  # long [T]: index of the last position of the example holding t
    teacher_ids: torch.Tensor  # long [T, m]: draft-vocab indices of the teacher's top m at t (next token t + 1)
    teacher_probs: torch.Tensor  # float [T, m]: their renormalised probabilities


@torch.no_grad()
def flatten_examples(examples: list[dict], lm_weight: torch.Tensor, teacher_top: int, chunk: int = 4096) -> FlatData:
    """Concatenate ``examples`` and compute the sparse teacher at every position (see the glossary)."""
    finals, answers, lasts = [], [], []
    start = 0
    store = torch.float16 if all(ex["final"].dtype == torch.float16 for ex in examples) else torch.bfloat16
    for ex in examples:
        n = ex["tokens"].shape[0]
        finals.append(ex["final"][:n].to(store))
        answers.append(ex["loss_mask"][:n].bool())
        lasts.append(torch.full((n,), start + n - 1, dtype=torch.long))
        start += n
    final = torch.cat(finals)
    m = min(teacher_top, lm_weight.shape[0])
    ids = torch.empty((final.shape[0], m), dtype=torch.long)
    probs = torch.empty((final.shape[0], m))
    w = lm_weight.float()
    for s in range(0, final.shape[0], chunk):
        top = (final[s:s + chunk].float() @ w.T).softmax(-1).topk(m, dim=-1)
        ids[s:s + chunk] = top.indices
        probs[s:s + chunk] = top.values / top.values.sum(-1, keepdim=True)
    return FlatData(final, torch.cat(answers), torch.cat(lasts), ids, probs)


def _scored_starts(data: FlatData) -> torch.Tensor:
    """Positions t whose head-1 target (t + 2) is an answer token of the same example."""
    t = torch.arange(data.final.shape[0])
    ok = t + 2 <= data.last
    ok[ok.clone()] &= data.answer[(t + 2)[ok]]
    return t[ok]


def blockwise_loss(heads: BlockwiseHeads, data: FlatData, starts: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """(mean soft cross-entropy over heads, top-1 accuracy per head) at positions ``starts`` long [N]."""
    x = data.final[starts].float()  # [N, d]
    logits = heads(x)  # [N, h, Vd]
    total, weight, acc = 0.0, 0, []
    for i in range(heads.num_heads):
        tgt = starts + i + 1  # the position whose next token head i predicts
        ok = (tgt + 1 <= data.last[starts])
        ok[ok.clone()] &= data.answer[(tgt + 1)[ok]]
        if not bool(ok.any()):
            acc.append(float("nan"))
            continue
        lp = logits[ok, i].float().log_softmax(-1)  # [M, Vd]
        ids, q = data.teacher_ids[tgt[ok]], data.teacher_probs[tgt[ok]]
        total = total - (q * lp.gather(-1, ids)).sum(-1).mean()
        weight += 1
        acc.append(float((lp.argmax(-1) == ids[:, 0]).float().mean()))
    return total / max(weight, 1), acc


@torch.no_grad()
def blockwise_heldout_top1(heads: BlockwiseHeads, held: list[dict], teacher_top: int = 8) -> list[float]:
    """Top-1 per head on ``held`` (head i's top token against the target's top token i places ahead, given a
    correct prefix, on answer tokens): the figure :func:`train_blockwise_heads` reports, for any attached heads."""
    data = flatten_examples(held, heads._lm_weight, teacher_top)
    starts = _scored_starts(data)
    return blockwise_loss(heads, data, starts)[1] if starts.numel() else []


def train_blockwise_heads(target: Any, examples: list[dict], out_dir: str | Path, *,
                          config: BlockwiseTraining = BlockwiseTraining(), minutes: float = float("inf"),
                          tokenizer: Any = None, progress: bool = True, holdout: int = 16,
                          heldout_examples: list[dict] | None = None) -> dict:
    """Train (or continue training) blockwise heads for ``target`` on ``examples`` (dicts with ``tokens``,
    ``loss_mask`` and ``final``, as :mod:`mmspec.distill.data` writes them); returns a summary dict.
    ``heldout_examples``: the held-out set, given (e.g. another split); otherwise ``holdout`` drawn from ``examples``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    held, train = split_off_heldout(examples, heldout_examples, holdout, config.seed, "train heads")
    state_path = out / "train_state.pt"
    state = read_checkpoint(state_path)
    if state is not None:  # the loop loads the weights; the architecture and draft vocabulary come from here
        heads = BlockwiseHeads(BlockwiseConfig(**state["config"]), d2t=state["model"]["d2t"])
        cov = state["coverage"]
    else:
        d2t, cov = draft_vocabulary(target, train, config.draft_vocab_size, tokenizer)
        heads = BlockwiseHeads(BlockwiseConfig.from_target(target, num_heads=config.num_heads,
                                                           draft_vocab_size=int(d2t.numel()),
                                                           num_layers=config.num_layers), d2t=d2t)
    heads.attach(target)
    data = flatten_examples(train, heads._lm_weight, config.teacher_top)
    starts = _scored_starts(data)
    if starts.numel() == 0:
        raise ValueError("no example has an answer token two positions after another token: nothing to score")

    def loss_fn(step: int):
        g = torch.Generator().manual_seed(step_seed(config.seed, step))
        pick = starts[torch.randint(starts.numel(), (min(config.positions_per_step, starts.numel()),), generator=g)]
        loss, acc = blockwise_loss(heads, data, pick)
        return loss, {"acc": acc}

    res = train_loop("train blockwise heads", heads, loss_fn, config.loop, state_path, minutes=minutes,
                     progress=progress, extra={"config": asdict(heads.config), "coverage": cov}, state=state)
    held_acc = blockwise_heldout_top1(heads, held, config.teacher_top)
    summary = {"steps": res.steps_done, "finished": res.finished, "num_heads": heads.num_heads,
               "draft_vocab_size": int(heads.d2t.numel()), "draft_vocab_coverage": round(cov, 4),
               "heldout_top1_per_head": [round(a, 4) for a in held_acc], "train_loss_ema": res.final_loss,
               "examples": len(train), "heldout_examples": len(held), "train_positions": int(starts.numel())}
    heads.save(out, extra={"training": summary})
    save_corpus(out, train)
    return summary


def save_corpus(folder: str | Path, examples: list[dict]) -> Path:
    """``corpus.safetensors``: the answer tokens of ``examples`` as one int32 table, documents separated by -1
    (local text for :class:`~mmspec.drafters.lattice_rescoring.NGramRescorer`, see :func:`load_corpus_ngram`)."""
    parts = []
    for ex in examples:
        answer = ex["tokens"][ex["loss_mask"].bool()]
        if answer.numel():
            parts += [answer.to(torch.int32), torch.tensor([SEPARATOR], dtype=torch.int32)]
    table = torch.cat(parts) if parts else torch.zeros((0,), dtype=torch.int32)
    path = Path(folder) / CORPUS_NAME
    save_file({"tokens": table.contiguous()}, str(path))
    return path


def load_corpus_ngram(folder: str | Path, vocab_size: int, order: int = 3):
    """The n-gram model of a heads folder's ``corpus.safetensors`` (a table passed to the rescorer, built once)."""
    path = Path(folder) / CORPUS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no n-gram corpus at {path}")
    return NGramModel.from_corpus(load_file(str(path))["tokens"], order, vocab_size)

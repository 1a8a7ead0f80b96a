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
    run dir      ``out/train_state.pt`` (heads + optimiser + step) while training, re-running continues; the
                 finished heads are ``out/blockwise.safetensors`` + ``out/blockwise_config.json``, and
                 ``out/corpus.safetensors`` keeps the training answers' tokens (local text for n-gram rescoring)
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from ..heads.blockwise import BlockwiseConfig, BlockwiseHeads

CORPUS_NAME = "corpus.safetensors"


@dataclass(frozen=True)
class BlockwiseTraining:
    num_heads: int = 4
    num_layers: int = 1
    draft_vocab_size: int = 4096
    teacher_top: int = 8
    positions_per_step: int = 512
    lr: float = 1e-3
    warmup: int = 20
    steps: int = 1500
    seed: int = 0
    save_every: int = 50


class FlatData(NamedTuple):
    final: torch.Tensor  # float16 [T, d]: every example's final hidden states, concatenated
    answer: torch.Tensor  # bool [T]: answer tokens
    last: torch.Tensor  # long [T]: index of the last position of the example holding t
    teacher_ids: torch.Tensor  # long [T, m]: draft-vocab indices of the teacher's top m at t (next token t + 1)
    teacher_probs: torch.Tensor  # float [T, m]: their renormalised probabilities


@torch.no_grad()
def flatten_examples(examples: list[dict], lm_weight: torch.Tensor, teacher_top: int, chunk: int = 4096) -> FlatData:
    """Concatenate ``examples`` and compute the sparse teacher at every position (see the glossary)."""
    finals, answers, lasts = [], [], []
    start = 0
    for ex in examples:
        n = ex["tokens"].shape[0]
        finals.append(ex["final"][:n].half())
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


def train_blockwise_heads(target: Any, examples: list[dict], out_dir: str | Path, *,
                          config: BlockwiseTraining = BlockwiseTraining(), minutes: float = float("inf"),
                          tokenizer: Any = None, progress: bool = True, holdout: int = 16) -> dict:
    """Train (or continue training) blockwise heads for ``target`` on ``examples`` (dicts with ``tokens``,
    ``loss_mask`` and ``final``, as :mod:`mmspec.distill.data` writes them); returns a summary dict."""
    from .train_head import draft_vocabulary, lr_at

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    examples = [e for e in examples if e["tokens"].shape[0] >= 4 and bool(e["loss_mask"].any())]
    if len(examples) <= holdout:
        raise ValueError(f"need more than {holdout} usable examples to train heads, got {len(examples)}")
    order = list(range(len(examples)))
    random.Random(config.seed).shuffle(order)
    held, train = [examples[i] for i in order[:holdout]], [examples[i] for i in order[holdout:]]
    state_path = out / "train_state.pt"
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        heads = BlockwiseHeads(BlockwiseConfig(**state["config"]), d2t=state["d2t"])
        heads.load_state_dict(state["heads"])
        cov = state["coverage"]
    else:
        d2t, cov = draft_vocabulary(target, train, config.draft_vocab_size, tokenizer)
        heads = BlockwiseHeads(BlockwiseConfig.from_target(target, num_heads=config.num_heads,
                                                           draft_vocab_size=int(d2t.numel()),
                                                           num_layers=config.num_layers), d2t=d2t)
        state = None
    heads.attach(target)
    heads.train()
    data = flatten_examples(train, heads._lm_weight, config.teacher_top)
    starts = _scored_starts(data)
    if starts.numel() == 0:
        raise ValueError("no example has an answer token two positions after another token: nothing to score")
    params = [p for p in heads.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0, betas=(0.9, 0.95))
    step = 0
    if state is not None:
        opt.load_state_dict(state["opt"])
        step = state["step"]

    def save_state() -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({"config": asdict(heads.config), "d2t": heads.d2t, "heads": heads.state_dict(),
                    "opt": opt.state_dict(), "step": step, "coverage": cov}, tmp)
        tmp.rename(state_path)

    t0 = time.time()
    bar = tqdm(total=config.steps, initial=step, desc="train blockwise heads", unit="step", disable=not progress)
    ema, accs = None, None
    while step < config.steps and (time.time() - t0) / 60 < minutes:
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)  # batch = f(seed, step)
        pick = starts[torch.randint(starts.numel(), (min(config.positions_per_step, starts.numel()),), generator=g)]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, config)
        loss, acc = blockwise_loss(heads, data, pick)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        value = float(loss.detach())
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        accs = acc if accs is None else [b if math.isnan(a) else 0.95 * a + 0.05 * b for a, b in zip(accs, acc)]
        bar.set_postfix(loss=f"{ema:.3f}", acc="/".join(f"{a:.2f}" for a in accs))
        bar.update(1)
        if step % config.save_every == 0:
            save_state()
    bar.close()
    save_state()
    heads.eval()
    held_data = flatten_examples(held, heads._lm_weight, config.teacher_top)
    held_starts = _scored_starts(held_data)
    with torch.no_grad():
        _, held_acc = blockwise_loss(heads, held_data, held_starts) if held_starts.numel() else (None, [])
    summary = {"steps": step, "finished": step >= config.steps, "num_heads": heads.num_heads,
               "draft_vocab_size": int(heads.d2t.numel()), "draft_vocab_coverage": round(cov, 4),
               "heldout_top1_per_head": [round(a, 4) for a in held_acc], "train_loss_ema": ema,
               "examples": len(train), "heldout_examples": len(held), "train_positions": int(starts.numel())}
    heads.save(out, extra={"training": summary})
    save_corpus(out, train)
    return summary


def save_corpus(folder: str | Path, examples: list[dict]) -> Path:
    """``corpus.safetensors``: the answer tokens of ``examples`` as one int32 table, documents separated by -1
    (local text for :class:`~mmspec.drafters.lattice_rescoring.NGramRescorer`, see :func:`load_corpus_ngram`)."""
    from safetensors.torch import save_file

    from ..drafters.lattice_rescoring import SEPARATOR

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
    from safetensors.torch import load_file

    from ..drafters.lattice_rescoring import NGramModel

    path = Path(folder) / CORPUS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no n-gram corpus at {path}")
    return NGramModel.from_corpus(load_file(str(path))["tokens"], order, vocab_size)

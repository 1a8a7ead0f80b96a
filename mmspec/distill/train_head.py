"""Training an EAGLE-3 head on self-distillation data with training-time test.

Paper: Li et al., EAGLE-3 (arXiv 2503.01840); the draft vocabulary is FR-Spec's (arXiv 2502.14856).

Glossary:
    TTT loss     EAGLE-3's training-time test (:func:`mmspec.heads.ttt.ttt_loss`, whose glossary defines the
                 teacher, the TTT steps j weighted ``step_decay ** j`` and the accuracy per step) on a batch of
                 ``batch_size`` examples drawn from (seed, step)
    draft vocab  FR-Spec's: the ``draft_vocab_size`` most frequent tokens of the training examples, EOS and
                 the special tokens always in (:func:`draft_vocabulary`); coverage: the share of answer tokens
                 inside it
    run dir      ``out/train_state.pt`` (the loop's checkpoint: head + optimiser + step, and the head's
                 config and draft-vocabulary coverage) while training; re-running continues; the finished
                 head is ``out/head.safetensors`` + ``out/head_config.json``
    loop         :func:`mmspec.distill.loop.train_loop` with ``HeadTraining.loop``: warm-up + cosine to 10 %,
                 AdamW betas (0.9, 0.95) without weight decay, gradient norm clipped to 1, a save every 25 steps
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..heads.eagle3 import Eagle3Config, Eagle3Head, feature_layers
from ..heads.frspec import count_tokens, coverage, rank_vocabulary
from ..heads.ttt import make_batch, ttt_loss
from .data import cpu_autocast, split_off_heldout
from .loop import LoopConfig, read_checkpoint, step_seed, train_loop


@dataclass(frozen=True)
class HeadTraining:
    draft_vocab_size: int = 4096
    ttt_steps: int = 3
    step_decay: float = 0.8
    batch_size: int = 8
    max_len: int = 256
    #: train on a random ``max_len`` window of each example (at its own positions) instead of its first tokens:
    #: conversations are longer than a training row
    windows: bool = False
    #: ``"bfloat16"``: the head's training forwards and backwards under CPU bf16 autocast (weights, optimiser,
    #: teacher and loss stay float32; where the CPU has AMX). The held-out accuracy is measured in float32
    autocast: str | None = None
    seed: int = 0
    loop: LoopConfig = LoopConfig(steps=2000, lr=5e-4, warmup=20, schedule="cosine", betas=(0.9, 0.95),
                                  weight_decay=0.0, clip_norm=1.0, save_every=25)


def draft_vocabulary(target: Any, examples: list[dict], size: int, tokenizer: Any = None) -> tuple[torch.Tensor, float]:
    vocab = target.get_output_embeddings().weight.shape[0]
    counts = count_tokens((ex["tokens"] for ex in examples), vocab)
    always = set()
    eos = target.generation_config.eos_token_id
    always |= {eos} if isinstance(eos, int) else set(eos or [])
    if tokenizer is not None:
        always |= {i for i in tokenizer.all_special_ids if i is not None and i < vocab}
    d2t = rank_vocabulary(counts, size, always=always)
    answers = count_tokens((ex["tokens"][ex["loss_mask"]] for ex in examples), vocab)
    return d2t, coverage(answers, d2t)


def train_head(target: Any, examples: list[dict], out_dir: str | Path, *, config: HeadTraining = HeadTraining(),
               minutes: float = float("inf"), tokenizer: Any = None, progress: bool = True,
               holdout: int = 16, init: Eagle3Head | None = None, heldout_examples: list[dict] | None = None) -> dict:
    """Train (or continue training) a head for ``target`` on ``examples``; returns a summary dict.
    ``init``: a trained head to start from (fine-tuning; its draft vocabulary is kept) instead of a new one.
    ``heldout_examples``: the held-out set, given (when ``examples`` hold several variants of one source
    example, they must be split by source); otherwise ``holdout`` examples are drawn from ``examples``."""
    cpu_autocast(config.autocast)  # a bad value is an error before any work
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    held, train = split_off_heldout(examples, heldout_examples, holdout, config.seed, "train a head")
    state_path = out / "train_state.pt"
    state = read_checkpoint(state_path)
    if state is not None:  # the loop loads the weights; the architecture and draft vocabulary come from here
        head = Eagle3Head(Eagle3Config(**state["config"]), d2t=state["model"]["d2t"])
        cov = state["coverage"]
    elif init is not None:
        head = init
        answers = count_tokens((ex["tokens"][ex["loss_mask"]] for ex in train), head.config.target_vocab_size)
        cov = coverage(answers, head.d2t)
    else:
        d2t, cov = draft_vocabulary(target, train, config.draft_vocab_size, tokenizer)
        head = Eagle3Head(Eagle3Config.from_target(target, len(d2t), _feature_layers(target)), d2t=d2t)
        head.init_from_target(target)
    head.attach(target)

    def loss_fn(step: int):
        g = random.Random(step_seed(config.seed, step))
        idx = [g.randrange(len(train)) for _ in range(config.batch_size)]
        offsets = ([g.randrange(max(1, train[i]["tokens"].shape[0] - config.max_len + 1)) for i in idx]
                   if config.windows else None)
        with cpu_autocast(config.autocast):
            loss, acc = ttt_loss(head, make_batch(train, idx, config.max_len, offsets), config.ttt_steps,
                                 config.step_decay)
        return loss, {"acc": acc}

    res = train_loop("train head (TTT)", head, loss_fn, config.loop, state_path, minutes=minutes, progress=progress,
                     extra={"config": asdict(head.config), "coverage": cov}, state=state)
    held_acc = heldout_accuracy(head, held, config)
    summary = {"steps": res.steps_done, "finished": res.finished, "draft_vocab_size": int(head.d2t.numel()),
               "draft_vocab_coverage": round(cov, 4), "heldout_top1_per_step": [round(a, 4) for a in held_acc],
               "train_loss_ema": res.final_loss, "examples": len(train), "heldout_examples": len(held)}
    head.save(out, extra={"training": summary})
    return summary


@torch.no_grad()
def heldout_accuracy(head: Eagle3Head, held: list[dict], config: HeadTraining) -> list[float]:
    """Top-1 agreement with the teacher per TTT step on ``held``: with ``config.windows`` every example whole, in
    consecutive ``max_len`` windows, batches of ``batch_size`` rows weighted by their answer tokens; otherwise
    the first ``max_len`` tokens of each, in one batch."""
    rows = [(i, o) for i, ex in enumerate(held)
            for o in (range(0, ex["tokens"].shape[0], config.max_len) if config.windows else (0,))]
    rows = [(i, o) for i, o in rows if bool(held[i]["loss_mask"][o + 1:o + config.max_len].any())] or rows
    if not config.windows:  # one batch, as before windows existed (the recorded summaries stay comparable)
        return ttt_loss(head, make_batch(held, list(range(len(held))), config.max_len), config.ttt_steps,
                        config.step_decay)[1]
    total, acc = 0.0, None
    for s in range(0, len(rows), config.batch_size):
        part = rows[s:s + config.batch_size]
        batch = make_batch(held, [i for i, _ in part], config.max_len, [o for _, o in part])
        _, a = ttt_loss(head, batch, config.ttt_steps, config.step_decay)
        w = float(batch.loss_mask.sum())
        acc = [x * w for x in a] if acc is None else [y + x * w for x, y in zip(a, acc)]
        total += w
    return [x / max(total, 1.0) for x in acc]


def _feature_layers(target: Any) -> tuple[int, int, int]:
    return feature_layers(target.config.get_text_config().num_hidden_layers
                          if hasattr(target.config, "get_text_config") else target.config.num_hidden_layers)

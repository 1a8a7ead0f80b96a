"""Training an EAGLE-3 head on self-distillation data with training-time test.

Paper: Li et al., EAGLE-3 (arXiv 2503.01840); the draft vocabulary is FR-Spec's (arXiv 2502.14856).

Glossary:
    teacher      the target's distribution at each position, restricted to the draft vocabulary and
                 renormalised: softmax(final @ lm_head[d2t].T)
    TTT step j   the head run on its own hidden states j times (:meth:`Eagle3Head.forward_ttt`); its row t
                 predicts token t + j + 2, scored by soft cross-entropy against the teacher there, weighted
                 ``step_decay ** j``; only answer tokens are scored
    accuracy     per step, how often the head's top draft token equals the target's top token (full
                 vocabulary): the chain acceptance the head would reach at that depth, given the prefix
    run dir      ``out/train_state.pt`` (head + optimiser + step) while training; re-running continues;
                 the finished head is ``out/head.safetensors`` + ``out/head_config.json``
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..heads.eagle3 import Eagle3Config, Eagle3Head, feature_layers
from ..heads.ttt import make_batch, ttt_loss
from ..heads.frspec import count_tokens, coverage, rank_vocabulary


@dataclass(frozen=True)
class HeadTraining:
    draft_vocab_size: int = 4096
    ttt_steps: int = 3
    step_decay: float = 0.8
    batch_size: int = 8
    max_len: int = 256
    lr: float = 5e-4
    warmup: int = 20
    steps: int = 2000  # the schedule's length (``minutes`` may stop earlier; a rerun continues)
    seed: int = 0
    save_every: int = 25


def lr_at(step: int, cfg: Any) -> float:
    """Linear warm-up then cosine decay to 10 % (``cfg``: any training config with lr, warmup and steps)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = min(1.0, (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1))
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))


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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    examples = [e for e in examples if e["tokens"].shape[0] >= 4 and bool(e["loss_mask"].any())]
    if len(examples) <= holdout:
        raise ValueError(f"need more than {holdout} usable examples to train a head, got {len(examples)}")
    if heldout_examples is not None:
        held, train = list(heldout_examples), examples
    else:
        rng = random.Random(config.seed)
        order = list(range(len(examples)))
        rng.shuffle(order)
        held, train = [examples[i] for i in order[:holdout]], [examples[i] for i in order[holdout:]]
    state_path = out / "train_state.pt"
    layers = tuple(int(x) for x in _layers_of(examples, target))
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        head = Eagle3Head(Eagle3Config(**state["config"]), d2t=state["d2t"])
        head.load_state_dict(state["head"])
        cov = state["coverage"]
    elif init is not None:
        head = init
        answers = count_tokens((ex["tokens"][ex["loss_mask"]] for ex in train), head.config.target_vocab_size)
        cov = coverage(answers, head.d2t)
        state = None
    else:
        d2t, cov = draft_vocabulary(target, train, config.draft_vocab_size, tokenizer)
        head = Eagle3Head(Eagle3Config.from_target(target, len(d2t), layers), d2t=d2t)
        head.init_from_target(target)
        state = None
    head.attach(target)
    head.train()
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0, betas=(0.9, 0.95))
    step = 0
    if state is not None:
        opt.load_state_dict(state["opt"])
        step = state["step"]
    t0 = time.time()
    bar = tqdm(total=config.steps, initial=step, desc="train head (TTT)", unit="step", disable=not progress)
    ema, accs = None, None

    def save_state() -> None:
        from dataclasses import asdict

        cfg = asdict(head.config)
        torch.save({"config": cfg, "d2t": head.d2t, "head": head.state_dict(), "opt": opt.state_dict(), "step": step,
                    "coverage": cov}, state_path.with_suffix(".tmp"))
        state_path.with_suffix(".tmp").rename(state_path)

    while step < config.steps and (time.time() - t0) / 60 < minutes:
        g = random.Random(config.seed * 1_000_003 + step)  # the batch is a pure function of (seed, step)
        idx = [g.randrange(len(train)) for _ in range(config.batch_size)]
        batch = make_batch(train, idx, config.max_len)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, config)
        loss, acc = ttt_loss(head, batch, config.ttt_steps, config.step_decay)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        loss = float(loss.detach())
        ema = loss if ema is None else 0.95 * ema + 0.05 * loss
        accs = acc if accs is None else [0.95 * a + 0.05 * b for a, b in zip(accs, acc)]
        bar.set_postfix(loss=f"{ema:.3f}", acc="/".join(f"{a:.2f}" for a in accs))
        bar.update(1)
        if step % config.save_every == 0:
            save_state()
    bar.close()
    save_state()
    head.eval()
    with torch.no_grad():
        _, held_acc = ttt_loss(head, make_batch(held, list(range(len(held))), config.max_len), config.ttt_steps,
                               config.step_decay)
    summary = {"steps": step, "finished": step >= config.steps, "draft_vocab_size": int(head.d2t.numel()),
               "draft_vocab_coverage": round(cov, 4), "heldout_top1_per_step": [round(a, 4) for a in held_acc],
               "train_loss_ema": ema, "examples": len(train), "heldout_examples": len(held)}
    head.save(out, extra={"training": summary})
    return summary


def _layers_of(examples: list[dict], target: Any) -> tuple[int, int, int]:
    return feature_layers(target.config.get_text_config().num_hidden_layers
                          if hasattr(target.config, "get_text_config") else target.config.num_hidden_layers)

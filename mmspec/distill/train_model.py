"""A standalone drafter LM distilled from the target: the target's first layers, trained to match its
distributions (the drafter kind HF assisted generation can use too).

Paper: knowledge distillation for speculative decoding as in DistillSpec (Zhou et al., ICLR 2024),
on the target's own answers (self-distillation).

Glossary:
    student      the target's architecture cut to its first ``num_layers`` decoder layers (initialised
                 from them, with the target's final norm), sharing the target's token embedding and LM
                 head, which stay frozen and are never saved with the drafter
    loss         soft cross-entropy of the student's logits against the target's distribution
                 softmax(final @ lm_head.T) on answer tokens (the full vocabulary)
    saved        ``drafter.safetensors`` (the student's own weights in float16) + ``config.json`` (the
                 cut target config) + ``drafter_info.json``; :func:`load_model_drafter` rebuilds a normal
                 HF causal LM around the target's embedding and head
    run dir      ``out/train_state.pt`` (the loop's checkpoint: the student's own weights + optimiser + step)
                 while training; re-running continues
    loop         :func:`mmspec.distill.loop.train_loop` with ``MODEL_LOOP``: a 20-step warm-up ramp times a
                 linear decay to 10 % over the run (``schedule="linear"``), AdamW betas (0.9, 0.95) with
                 weight decay 0.01, gradient norm clipped to 1, a save every 25 steps
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from ..heads.ttt import make_batch
from ..truncate import truncated_copy
from .data import split_off_heldout
from .loop import LoopConfig, Weights, step_seed, train_loop

#: the distilled drafter LM's loop (its own schedule: the warm-up ramp times a linear decay over the run)
MODEL_LOOP = LoopConfig(steps=1000, lr=3e-4, warmup=20, schedule="linear", betas=(0.9, 0.95), weight_decay=0.01,
                        clip_norm=1.0, save_every=25)


def cut_model(target: torch.nn.Module, num_layers: int) -> torch.nn.Module:
    """A copy of ``target`` keeping its first ``num_layers`` decoder layers, the embedding and head shared."""
    embed, head = target.get_input_embeddings(), target.get_output_embeddings()
    student = truncated_copy(target, num_layers, share=(embed.weight, head.weight))  # no copy of the big tables
    student.set_input_embeddings(embed)
    student.set_output_embeddings(head)
    return student


def _shared_names(model: torch.nn.Module) -> set[str]:
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return {n for n, p in model.named_parameters(remove_duplicate=False) if p is emb or p is head}


def own_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    shared = _shared_names(model)
    return {k: v for k, v in model.state_dict().items() if k not in shared}


def load_model_drafter(folder: str | Path, target: torch.nn.Module, *, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The distilled drafter as a HF causal LM around ``target``'s embedding and head."""
    folder = Path(folder)
    if not (folder / "drafter.safetensors").is_file():
        raise FileNotFoundError(f"no distilled drafter at {folder} (drafter.safetensors missing)")
    config = AutoConfig.from_pretrained(folder)
    dtype = dtype or next(target.parameters()).dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.to_empty(device=next(target.parameters()).device)
    model.set_input_embeddings(target.get_input_embeddings())
    model.set_output_embeddings(target.get_output_embeddings())
    sd = load_file(str(folder / "drafter.safetensors"))
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False)
    shared = _shared_names(model)
    missing = [m for m in missing if m not in shared]
    if unexpected or missing:
        raise ValueError(f"drafter weights do not fit its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    # buffers (rotary frequencies) are not in the state dict and to_empty left them uninitialised: copy the
    # target's (same config, same names); recompute from the config any the target does not have
    own = dict(target.named_buffers())
    with torch.no_grad():
        for mod_name, module in model.named_modules():
            if not hasattr(module, "inv_freq"):
                continue
            for buf_name in ("inv_freq", "original_inv_freq"):
                src = own.get(f"{mod_name}.{buf_name}")
                buf = getattr(module, buf_name, None)
                if isinstance(buf, torch.Tensor) and src is not None and src.shape == buf.shape:
                    buf.copy_(src)
                    continue
                init = getattr(module, "rope_init_fn", None) or getattr(module, "compute_default_rope_parameters", None)
                if init is None:
                    raise ValueError(f"cannot initialise the drafter's rotary frequencies ({mod_name}.{buf_name})")
                inv, _ = init(module.config, module.inv_freq.device)
                if isinstance(buf, torch.Tensor):
                    buf.copy_(inv)
    model.generation_config = copy.deepcopy(target.generation_config)
    return model.to(dtype).eval()


def _distill_loss(student: torch.nn.Module, head_w: torch.Tensor, batch) -> tuple[torch.Tensor, float]:
    """(soft cross-entropy to the target's distribution, top-1 agreement) over ``batch``'s answer positions."""
    tokens, valid, lmask, final, pos = batch.tokens, batch.valid, batch.loss_mask, batch.final, batch.positions
    logits = student(input_ids=tokens, attention_mask=valid, position_ids=pos).logits  # [B, L, V]
    score = lmask[:, 1:] & valid[:, 1:].bool()  # position t predicts token t + 1
    lg = logits[:, :-1][score].float()
    with torch.no_grad():
        teacher = (final[:, :-1][score] @ head_w.T).softmax(-1)
    loss = -(teacher * lg.log_softmax(-1)).sum(-1).mean()
    return loss, float((lg.argmax(-1) == teacher.argmax(-1)).float().mean())


@torch.no_grad()
def drafter_heldout_top1(drafter: torch.nn.Module, target: Any, held: list[dict], max_len: int = 256) -> float:
    """How often ``drafter``'s top token is the target's on ``held``'s answer positions (the first ``max_len``
    tokens of each example): the figure :func:`train_model_drafter` reports, for any drafter LM (e.g. a shipped one)."""
    head_w = target.get_output_embeddings().weight.detach().float()
    return _distill_loss(drafter, head_w, make_batch(held, list(range(len(held))), max_len))[1]


def train_model_drafter(target: Any, examples: list[dict], out_dir: str | Path, *, num_layers: int = 2,
                        minutes: float = float("inf"), loop: LoopConfig = MODEL_LOOP, batch_size: int = 4,
                        max_len: int = 256, seed: int = 0, progress: bool = True, holdout: int = 16,
                        heldout_examples: list[dict] | None = None, windows: bool = False) -> dict:
    """Distil (or continue distilling) a ``num_layers`` drafter from ``target``; returns a summary.
    ``heldout_examples``: the held-out set, given (e.g. another split); otherwise ``holdout`` drawn from ``examples``.
    ``windows``: each row is a random ``max_len`` window of its example (long conversations), not its beginning."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    held, train = split_off_heldout(examples, heldout_examples, holdout, seed, "distil a drafter")
    student = cut_model(target, num_layers)
    shared = _shared_names(student)
    for n, p in student.named_parameters(remove_duplicate=False):
        p.requires_grad_(n not in shared)  # the target's embedding and head stay frozen
    head_w = target.get_output_embeddings().weight.detach().float()

    def loss_fn(step: int):
        g = random.Random(step_seed(seed, step))
        idx = [g.randrange(len(train)) for _ in range(batch_size)]
        offsets = ([g.randrange(max(1, train[i]["tokens"].shape[0] - max_len + 1)) for i in idx] if windows else None)
        loss, acc = _distill_loss(student, head_w, make_batch(train, idx, max_len, offsets))
        return loss, {"top1": acc}

    weights = Weights(lambda: own_state(student), lambda sd: student.load_state_dict(sd, strict=False))
    try:
        res = train_loop(f"distil {num_layers}-layer drafter", student, loss_fn, loop, out / "train_state.pt",
                         minutes=minutes, progress=progress, weights=weights)
    finally:
        for p in target.parameters():
            p.requires_grad_(True)
    held_acc = drafter_heldout_top1(student, target, held, max_len)
    summary = {"steps": res.steps_done, "finished": res.finished, "num_layers": num_layers,
               "heldout_top1": round(held_acc, 4), "train_loss_ema": res.final_loss, "examples": len(train)}
    save_file({k: v.to(torch.float16).contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in own_state(student).items()}, str(out / "drafter.safetensors"))
    student.config.save_pretrained(out)
    (out / "drafter_info.json").write_text(json.dumps({"kind": "model", "training": summary}, indent=2) + "\n")
    return summary

"""The one training loop (mmspec.distill.loop): a non-finite loss or gradient stops the run with a named error
before the optimiser step and leaves the last good checkpoint; every distill trainer resumes to exactly the
weights of an uninterrupted run; the schedules are the trainers' former formulas to the bit."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from mmspec.distill import train_blockwise, train_head, train_model
from mmspec.distill.data import target_features
from mmspec.distill.loop import LoopConfig, lr_at, read_checkpoint, train_loop
from mmspec.errors import MethodParameterError, NonFiniteError
from mmspec.heads.eagle3 import feature_layers
from tiny_models import build

CONFIG = LoopConfig(steps=8, lr=1e-2, warmup=2, schedule="cosine", betas=(0.9, 0.95), weight_decay=0.0,
                    clip_norm=1.0, save_every=2)


def _linear(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 1)


def _regression(model, bad_step=None, bad="nan"):
    def loss_fn(step):
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(step))
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        if step == bad_step:
            if bad == "nan":
                return loss * float("nan")
            return loss + (model.weight - model.weight.detach()).abs().sqrt().sum()  # finite loss, NaN gradient
        return loss
    return loss_fn


@pytest.mark.parametrize("bad, what", [("nan", "loss"), ("grad", "gradient norm")])
def test_a_non_finite_step_raises_before_the_optimiser_step_and_keeps_the_last_checkpoint(tmp_path, bad, what):
    model = _linear()
    ckpt = tmp_path / "lin.ckpt.pt"
    seen = {}
    loss_of = _regression(model, bad_step=5, bad=bad)

    def loss_fn(step):
        if step == 5:  # what the step found: the weights after step 4, the checkpoint saved after step 3
            seen["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
            seen["checkpoint"] = ckpt.read_bytes()
        return loss_of(step)

    with pytest.raises(NonFiniteError, match=rf"training run 'lin' at step 5: the {what} is nan \(NaN/inf\).*float16"):
        train_loop("lin", model, loss_fn, CONFIG, ckpt, progress=False)
    assert ckpt.read_bytes() == seen["checkpoint"]  # the last good checkpoint stays
    assert read_checkpoint(ckpt)["step"] == 4
    for name, value in model.state_dict().items():  # no optimiser step with the bad loss
        torch.testing.assert_close(value, seen["weights"][name], rtol=0, atol=0)
    # the run continues from that checkpoint once the loss is finite again
    res = train_loop("lin", model, _regression(model), CONFIG, ckpt, progress=False)
    assert res.finished and res.steps_done == 8 and math.isfinite(res.final_loss)


def test_an_interrupted_run_resumes_to_the_uninterrupted_weights(tmp_path):
    ref = _linear()
    assert train_loop("lin", ref, _regression(ref), CONFIG, tmp_path / "a.pt", progress=False).finished
    model = _linear()
    crash = _regression(model)

    def crashing(step):
        if step == 5:
            raise KeyboardInterrupt
        return crash(step)

    with pytest.raises(KeyboardInterrupt):
        train_loop("lin", model, crashing, CONFIG, tmp_path / "b.pt", progress=False)
    fresh = _linear(seed=1)  # other initial weights: only the step-4 checkpoint can fix them
    res = train_loop("lin", fresh, _regression(fresh), CONFIG, tmp_path / "b.pt", progress=False)
    assert res.steps_done == 8 and res.finished
    for a, b in zip(ref.state_dict().values(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_schedules_are_the_former_formulas():
    """"cosine": train_head's and the zoo's former lr_at (the same formula); "linear": train_model's."""
    def cosine(step, lr, warmup, steps):
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(steps - warmup, 1)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

    def linear(step, lr, steps):
        return lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / max(steps, 1)))

    for steps, warmup, lr in ((6, 2, 1e-3), (300, 10, 4e-4), (2000, 20, 5e-4), (3000, 100, 2e-3), (5, 50, 1e-3)):
        cfg = replace(CONFIG, steps=steps, warmup=warmup, lr=lr)
        assert [lr_at(s, cfg) for s in range(steps + 3)] == [cosine(s, lr, warmup, steps) for s in range(steps + 3)]
    for steps, lr in ((1000, 3e-4), (25, 3e-3), (7, 1e-3)):
        cfg = replace(CONFIG, steps=steps, warmup=20, lr=lr, schedule="linear")
        assert [lr_at(s, cfg) for s in range(steps + 1)] == [linear(s, lr, steps) for s in range(steps + 1)]


def test_loop_settings_are_checked():
    with pytest.raises(MethodParameterError, match="schedule must be one of"):
        replace(CONFIG, schedule="step")
    with pytest.raises(MethodParameterError, match="save_every"):
        replace(CONFIG, save_every=0)


# ------------------------------------------------------------------------ each distill trainer resumes exactly
def _examples(target, n=28, length=16):
    ids = torch.randint(3, 96, (n, length), generator=torch.Generator().manual_seed(0))
    feats, final = target_features(target, ids, torch.ones_like(ids), feature_layers(target.config.num_hidden_layers))
    lmask = torch.arange(length) >= 4
    return [{"tokens": ids[b], "loss_mask": lmask, "features": feats[b], "final": final[b]} for b in range(n)]


def _train(kind, target, examples, out):
    torch.manual_seed(0)  # a new head's initial weights (a resumed one takes the checkpoint's)
    if kind == "head":
        cfg = train_head.HeadTraining(draft_vocab_size=48, batch_size=4,
                                      loop=replace(train_head.HeadTraining.loop, steps=6, lr=3e-3, warmup=2, save_every=2))
        train_head.train_head(target, examples, out, config=cfg, progress=False, holdout=4)
        return load_file(str(out / "head.safetensors"))
    if kind == "heads":
        cfg = train_blockwise.BlockwiseTraining(num_heads=2, draft_vocab_size=48, positions_per_step=32, loop=replace(
            train_blockwise.BlockwiseTraining.loop, steps=6, lr=3e-3, warmup=2, save_every=2))
        train_blockwise.train_blockwise_heads(target, examples, out, config=cfg, progress=False, holdout=4)
        return load_file(str(out / "blockwise.safetensors"))
    loop = replace(train_model.MODEL_LOOP, steps=6, lr=3e-3, save_every=2)
    train_model.train_model_drafter(target, examples, out, num_layers=1, loop=loop, batch_size=2, progress=False,
                                    holdout=4)
    return load_file(str(out / "drafter.safetensors"))


@pytest.mark.parametrize("kind, module, batch_fn", [("head", train_head, "make_batch"),
                                                    ("heads", train_blockwise, "blockwise_loss"),
                                                    ("model", train_model, "make_batch")])
def test_distill_trainers_resume_to_the_uninterrupted_weights(tmp_path, monkeypatch, kind, module, batch_fn):
    target = build("llama", layers=2, dtype=torch.float32)
    examples = _examples(target)
    ref = _train(kind, target, examples, tmp_path / "ref")
    calls, real = [], getattr(module, batch_fn)

    def crash_on_the_fifth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # the batch of step index 4: steps 0-3 ran and were saved (save_every=2)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, batch_fn, crash_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        _train(kind, target, examples, tmp_path / "run")
    monkeypatch.setattr(module, batch_fn, real)
    assert read_checkpoint(tmp_path / "run" / "train_state.pt")["step"] == 4
    got = _train(kind, target, examples, tmp_path / "run")
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=0, msg=name)


def test_a_head_with_a_given_heldout_set_trains_on_few_examples(tmp_path):
    """The held-out set given apart (the SmolLM2 VLM's head): ``holdout`` does not bound the training set."""
    target = build("llama", layers=2, dtype=torch.float32)
    examples = _examples(target, n=8)
    cfg = train_head.HeadTraining(draft_vocab_size=48, batch_size=2,
                                  loop=replace(train_head.HeadTraining.loop, steps=2, warmup=1))
    summary = train_head.train_head(target, examples[:5], tmp_path, config=cfg, progress=False,
                                    heldout_examples=examples[5:])
    assert summary["finished"] and summary["examples"] == 5 and summary["heldout_examples"] == 3


def test_a_head_trained_under_bf16_autocast_keeps_float32_weights_and_learns(tmp_path):
    target = build("llama", layers=2, dtype=torch.float32)
    examples = _examples(target, n=12)
    loop = replace(train_head.HeadTraining.loop, steps=12, lr=3e-3, warmup=2)
    torch.manual_seed(0)
    summary = train_head.train_head(target, examples[:8], tmp_path, progress=False, heldout_examples=examples[8:],
                                    config=train_head.HeadTraining(draft_vocab_size=48, batch_size=2,
                                                                   autocast="bfloat16", loop=loop))
    weights = load_file(str(tmp_path / "head.safetensors"))
    assert summary["finished"] and math.isfinite(summary["train_loss_ema"])
    assert all(w.dtype != torch.bfloat16 for w in weights.values())
    with pytest.raises(ValueError, match="autocast must be None or 'bfloat16'"):
        train_head.train_head(target, examples, tmp_path / "x", progress=False,
                              config=train_head.HeadTraining(autocast="float16"))

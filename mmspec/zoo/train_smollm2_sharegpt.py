"""SmolLM2-135M-Instruct's drafters trained on real conversations (ShareGPT), and their data-scaling curve.

Paper: Li et al., EAGLE (arXiv 2401.15077: ShareGPT, fixed answers vs the target's own) and EAGLE-3 (arXiv
2503.01840: acceptance keeps growing with data; training-time test).

Glossary:
    cache       ``--cache`` (default ``~/.cache/mmspec/sharegpt/smollm2``): ``train/`` and ``dev/`` feature shards
                (:mod:`mmspec.distill.feature_shards`: SmolLM2's hidden states along ShareGPT conversations cut at
                1,024 tokens, bfloat16, about 4.6 kB a token); stage ``features`` fills it, resumably, in runs of
                at most ``--minutes``, up to ``--tokens`` (10.5 M by default, about 48 GB)
    throughput  measured on the 2-core AVX2 development machine: SmolLM2's forward with hidden states runs at
                about 220 tokens/s in float32 (8 x 512 or 4 x 1024 tokens a batch; a 4096 x 576 x 1536 matmul
                reaches 56 GFLOP/s there), so a 40-minute run adds about 0.5 M tokens and 10 M tokens would take
                12 hours; the planning figure of 820 tokens/s came from a faster CPU
    size        ``--tokens`` for stage ``head``: the head trains on the first shards holding that many tokens (a
                prefix of the training split; the data-scaling curve trains one head per size)
    held out    the dev split's first 64 conversations (``dev/``): top-1 per TTT step after every run
    run dir     ``--out``: the loop's checkpoint while training (re-running continues), then the head
                (``head.safetensors`` + ``head_config.json``, ``training_summary.json``)

Usage::

    python -m mmspec.zoo.train_smollm2_sharegpt features --minutes 55          # repeat until 10.5 M tokens
    python -m mmspec.zoo.train_smollm2_sharegpt head --tokens 2.5e6 --steps 900 --minutes 55 --out runs/head_2.5M
    python -m mmspec.zoo.train_smollm2_sharegpt tau --out runs/head_2.5M     # tau of chains of 4 on dev chat
    python -m mmspec.zoo.train_smollm2_sharegpt tau --prompts 24 --out A --compare B C   # heads interleaved
    python -m mmspec.zoo.train_smollm2_sharegpt self --minutes 40             # the target's own answers
    python -m mmspec.zoo.train_smollm2_sharegpt finetune --data self --init mmspec/zoo/weights/smollm2/head \
        --steps 400 --out runs/head_ft_self                                   # fine-tune a head on them
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from mmspec.distill.feature_shards import ShardedExamples, build_conversation_features
from mmspec.distill.train_head import HeadTraining, train_head
from mmspec.pretrained import cache_root, load_causal_lm

MAX_LEN = 1024  # conversation tokens kept (12.7 M tokens in the training split at this cut)
DEV_CONVERSATIONS = 64
HEAD = HeadTraining(draft_vocab_size=8192, ttt_steps=3, step_decay=0.8, batch_size=4, max_len=512, windows=True,
                    loop=replace(HeadTraining.loop, steps=400, lr=1e-3, warmup=20, save_every=20))


def default_cache() -> Path:
    return cache_root() / "sharegpt" / "smollm2"


def features(cache: Path, tokens: float, minutes: float, cache_gb: float, autocast: str | None = None) -> dict:
    """Training-split shards (under bf16 autocast if ``autocast``); the held-out dev shard always in float32,
    so every head is measured against the target's features as it decodes."""
    model, tok = load_causal_lm()
    build_conversation_features(model, tok, "sharegpt", cache / "dev", split="dev", max_len=MAX_LEN,
                                window=DEV_CONVERSATIONS, max_tokens=1, cache_gb=cache_gb)
    return build_conversation_features(model, tok, "sharegpt", cache / "train", split="train", max_len=MAX_LEN,
                                       max_tokens=tokens, minutes=minutes, cache_gb=cache_gb, autocast=autocast)


def _write_summary(out: Path, t0: float, summary: dict, **about) -> dict:
    """``out/training_summary.json``: what the stage trained on (``about``, first), its minutes since ``t0``, then
    the trainer's own summary."""
    summary = {**about, "minutes": round((time.time() - t0) / 60, 2), **summary}
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def head(cache: Path, out: Path, tokens: float, steps: int, minutes: float, draft_vocab: int,
         batch_size: int = HEAD.batch_size, autocast: str | None = None) -> dict:
    model, tok = load_causal_lm()
    examples = ShardedExamples(cache / "train", max_tokens=tokens)
    if examples.tokens < min(tokens, 1e5):
        raise SystemExit(f"the cache holds {examples.tokens:,} tokens, fewer than --tokens {tokens:,.0f}: run stage "
                         "features first")
    held = list(ShardedExamples(cache / "dev"))
    config = replace(HEAD, draft_vocab_size=draft_vocab, batch_size=batch_size, autocast=autocast,
                     loop=replace(HEAD.loop, steps=steps))
    t0 = time.time()
    summary = train_head(model, examples, out, config=config, minutes=minutes, tokenizer=tok, heldout_examples=held)
    return _write_summary(out, t0, summary, data="sharegpt", data_tokens=examples.tokens,
                          data_answer_tokens=examples.answer_tokens, data_examples=len(examples),
                          tokens_per_step=config.batch_size * config.max_len, autocast=autocast)


SELF_PROMPTS = 4096  # ShareGPT training-split first user turns the target answers (stage self)
FINETUNE = HeadTraining(draft_vocab_size=4096, ttt_steps=3, step_decay=0.8, batch_size=6, max_len=256,
                        loop=replace(HeadTraining.loop, steps=1000, lr=3e-4, warmup=20, save_every=25))


def self_answers(cache: Path, minutes: float, batch_size: int = 32, max_new_tokens: int = 192) -> dict:
    """The target's own answers (greedy and T = 0.7 batches alternating) to ShareGPT training-split first user
    turns of 20 to 1,500 characters (as the dev prompts tau decodes), with its features, as shards under
    ``cache/self`` (resumable; stops after ``minutes``). Batches hold prompts of similar length (little padding)
    and come in a shuffled order, so the batches a run finishes are a sample of every length."""
    import random

    from mmspec.distill import self_distillation_prompts
    from mmspec.distill.data import build_dataset, load_examples

    model, tok = load_causal_lm()
    prompts = sorted((p for p in self_distillation_prompts(SELF_PROMPTS, seed=0) if 20 <= len(p) <= 1500), key=len)
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    random.Random(0).shuffle(batches)
    batches.sort(key=lambda b: len(b) < batch_size)  # a short remainder goes last (the rest stay batch-aligned)
    prompts = [p for b in batches for p in b]
    t0 = time.time()
    build_dataset(model, tok, cache / "self", prompts=prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                  seed=0, minutes=minutes)
    ex = load_examples(cache / "self")
    return {"examples": len(ex), "answer_tokens": _answer_tokens(ex), "minutes": round((time.time() - t0) / 60, 2)}


def _answer_tokens(examples: list[dict]) -> int:
    return int(sum(int(e["loss_mask"].sum()) for e in examples))


def finetune(cache: Path, out: Path, init: Path, steps: int, minutes: float, data: str = "self",
             draft_vocab: int | None = None) -> dict:
    """Fine-tune the head in ``init`` on the target's own answers to ShareGPT prompts (``data="self"``:
    ``cache/self``) or on ShareGPT's fixed answers (``"fixed"``: the feature shards of ``cache/train``, windows of
    256), with the ShareGPT dev conversations as the held-out set. ``draft_vocab``: replace the head's draft
    vocabulary by the data's ``draft_vocab`` most frequent tokens (its layers kept); None keeps it."""
    from mmspec.distill.data import load_examples
    from mmspec.heads.eagle3 import Eagle3Head

    model, tok = load_causal_lm()
    if data == "self":
        examples, config = load_examples(cache / "self"), FINETUNE
    else:
        examples, config = ShardedExamples(cache / "train"), replace(FINETUNE, windows=True)
    held = list(ShardedExamples(cache / "dev"))
    head0 = Eagle3Head.load(init, model, dtype=torch.float32)
    if draft_vocab and not (out / "train_state.pt").is_file():  # a resumed run keeps its checkpoint's vocabulary
        from mmspec.distill.train_head import draft_vocabulary

        head0 = head0.with_draft_vocabulary(draft_vocabulary(model, examples, draft_vocab, tok)[0])
    config = replace(config, loop=replace(FINETUNE.loop, steps=steps))
    t0 = time.time()
    summary = train_head(model, examples, out, config=config, minutes=minutes, tokenizer=tok, init=head0,
                         heldout_examples=held)
    answer_tokens = examples.answer_tokens if data != "self" else _answer_tokens(examples)
    return _write_summary(out, t0, summary, data="self (ShareGPT prompts)" if data == "self" else
                          "fixed ShareGPT answers", init=str(init), new_draft_vocab=draft_vocab,
                          data_examples=len(examples), data_answer_tokens=answer_tokens)


DRAFTER_STEPS, BLOCKWISE_STEPS = 260, 1500  # the shipped drafter/ ran 260 steps


def model_drafter(cache: Path, out: Path, tokens: float, steps: int, minutes: float) -> dict:
    """The 2-layer drafter LM (what HF assisted generation uses) distilled on ShareGPT's fixed answers (the
    ``features`` shards: the target's distributions from their final hidden states, random windows of 256), with
    the held-out top-1 of the shipped ``drafter/`` on the same dev conversations beside it."""
    from mmspec.distill.train_model import MODEL_LOOP, drafter_heldout_top1, train_model_drafter
    from mmspec.zoo.smollm2 import load_smollm2_drafter

    model, tok = load_causal_lm()
    examples = ShardedExamples(cache / "train", max_tokens=tokens)
    held = list(ShardedExamples(cache / "dev"))
    t0 = time.time()
    summary = train_model_drafter(model, examples, out, num_layers=2, minutes=minutes,
                                  loop=replace(MODEL_LOOP, steps=steps), batch_size=4, max_len=256, windows=True,
                                  heldout_examples=held)
    shipped = drafter_heldout_top1(load_smollm2_drafter("model", model), model, held)
    return _write_summary(out, t0, summary, data="fixed ShareGPT answers", data_tokens=examples.tokens,
                          data_answer_tokens=examples.answer_tokens, shipped_heldout_top1=round(shipped, 4))


def blockwise(cache: Path, out: Path, tokens: float, steps: int, minutes: float) -> dict:
    """Blockwise parallel heads (4, FR-Spec vocabulary of 4,096) trained on ShareGPT's fixed answers (the
    ``features`` shards' final hidden states), with the held-out top-1 of the shipped ``heads/`` on the same dev
    conversations beside it."""
    from mmspec.distill.train_blockwise import BlockwiseTraining, blockwise_heldout_top1, train_blockwise_heads
    from mmspec.zoo.smollm2 import load_smollm2_drafter

    model, tok = load_causal_lm()
    examples = ShardedExamples(cache / "train", max_tokens=tokens)
    held = list(ShardedExamples(cache / "dev"))
    config = replace(BlockwiseTraining(), loop=replace(BlockwiseTraining.loop, steps=steps))
    t0 = time.time()
    summary = train_blockwise_heads(model, list(examples), out, config=config, minutes=minutes, tokenizer=tok,
                                    heldout_examples=held)
    shipped = blockwise_heldout_top1(load_smollm2_drafter("heads", model).heads, held, config.teacher_top)
    return _write_summary(out, t0, summary, data="fixed ShareGPT answers", data_tokens=examples.tokens,
                          data_answer_tokens=examples.answer_tokens,
                          shipped_heldout_top1_per_head=[round(a, 4) for a in shipped])


def tau(outs: list[Path], prompts: int = 8, max_new_tokens: int = 64, k: int = 4) -> dict:
    """Tokens per target forward of the heads in ``outs`` (chains of ``k``, greedy) on the first user turns of
    dev-split conversations after the feature cache's (held out from training and from the top-1 figure), the heads
    interleaved prompt by prompt; with P(A >= i), the share of steps accepting at least i drafts. Each head's
    ``training_summary.json`` gets its numbers."""
    from mmspec import engine
    from mmspec.distill import load_drafter
    from mmspec.distill.conversations import iter_sharegpt
    from mmspec.pretrained import chat_inputs

    model, tok = load_causal_lm()
    drafters = [load_drafter(out, model) for out in outs]
    turns = [t for _, t in iter_sharegpt("dev")][DEV_CONVERSATIONS:]
    texts = [t[0].text for t in turns if t[0].role == "user" and 20 <= len(t[0].text) <= 1500][:prompts]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    accepted, rows, hist = [0] * len(outs), [0] * len(outs), [[0] * (k + 1) for _ in outs]
    for text in texts:
        enc = chat_inputs(tok, [text])
        for h, drafter in enumerate(drafters):
            st = engine.generate(model, enc["input_ids"], drafter=drafter, num_draft_tokens=k,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos).stats
            accepted[h] += st.accepted_tokens
            rows[h] += st.row_steps
            for j, c in enumerate(st.accepted_length_counts[:k + 1]):
                hist[h][j] += c
    results = {}
    for h, out in enumerate(outs):
        result = {"tau_chain": round((accepted[h] + rows[h]) / max(rows[h], 1), 3), "tau_k": k, "tau_prompts": len(texts),
                  "tau_max_new_tokens": max_new_tokens,
                  "tau_accept_at_least": [round(sum(hist[h][j:]) / max(sum(hist[h]), 1), 3) for j in range(1, k + 1)]}
        path = out / "training_summary.json"
        if path.is_file():
            path.write_text(json.dumps({**json.loads(path.read_text()), **result}, indent=2) + "\n")
        results[str(out)] = result
    return results


def scaling(cache: Path, out: Path, sizes: list[float], steps: int, minutes: float, draft_vocab: int,
            autocast: str | None = None, prompts: int = 8, epochs: float | None = None) -> dict:
    """The data-scaling curve: one head per training-data size (a prefix of the training shards), trained in turn
    within ``minutes`` (re-running continues where it stopped). ``epochs`` None: every head on the same schedule
    of ``steps`` (the same compute: smaller sizes see their data more often); ``epochs`` E: each head's schedule
    passes over its data E times (steps = E x size / tokens a step: compute grows with data). Once every head has
    finished: their tau, interleaved, and ``out/scaling.json`` + ``out/scaling.png`` (held-out top-1 and tau
    against unique training tokens)."""
    t0 = time.time()
    runs = [out / f"tokens_{size:.3g}" for size in sizes]
    per_step = HEAD.batch_size * HEAD.max_len
    schedule = [steps if epochs is None else max(HEAD.loop.warmup + 1, math.ceil(epochs * size / per_step))
                for size in sizes]
    for size, run, steps_i in zip(sizes, runs, schedule):
        summary_path = run / "training_summary.json"
        if summary_path.is_file() and json.loads(summary_path.read_text()).get("finished"):
            continue
        left = minutes - (time.time() - t0) / 60
        if left <= 0.5:
            return {"finished": False, "stopped_at": str(run), "minutes": round((time.time() - t0) / 60, 2)}
        if not head(cache, run, size, steps_i, left, draft_vocab, autocast=autocast)["finished"]:
            return {"finished": False, "stopped_at": str(run), "minutes": round((time.time() - t0) / 60, 2)}
    taus = tau(runs, prompts=prompts)
    rows = []
    for size, run in zip(sizes, runs):
        s = json.loads((run / "training_summary.json").read_text())
        passes = s["steps"] * s["tokens_per_step"]
        rows.append({"size": size, "data_tokens": s["data_tokens"], "data_answer_tokens": s["data_answer_tokens"],
                     "steps": s["steps"], "token_passes": passes, "epochs": round(passes / s["data_tokens"], 2),
                     "heldout_top1_per_step": s["heldout_top1_per_step"], "minutes": s["minutes"],
                     **taus[str(run)]})
    result = {"steps": steps if epochs is None else None, "epochs": epochs, "autocast": autocast,
              "draft_vocab_size": draft_vocab, "rows": rows}
    (out / "scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot_scaling(rows, out / "scaling.png", epochs)
    return result


def _plot_scaling(rows: list[dict], path: Path, epochs: float | None = None, project_to: float = 1e7) -> None:
    """Held-out top-1 per TTT step and tau against unique training tokens (log scale), each with its least-squares
    line in log2(tokens) carried on, dashed, to ``project_to`` tokens (a projection, not a measurement)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the figure needs the bench extra; scaling.json holds the numbers
        return
    import numpy as np

    x = np.array([r["data_tokens"] for r in rows], dtype=float)
    far = np.array([x[-1], max(project_to, x[-1])])

    def draw(ax, y, label):
        line, = ax.plot(x, y, "o-", label=label)
        if len(x) >= 2 and far[1] > far[0]:
            slope, icept = np.polyfit(np.log2(x), y, 1)
            ax.plot(far, icept + slope * np.log2(far), "--", color=line.get_color(), alpha=0.6)

    fig, (a, b) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for j in range(len(rows[0]["heldout_top1_per_step"])):
        draw(a, [r["heldout_top1_per_step"][j] for r in rows], f"TTT step {j}")
    a.set(xscale="log", xlabel="unique training tokens", ylabel="held-out top-1 (ShareGPT dev)")
    a.legend(fontsize=8)
    draw(b, [r["tau_chain"] for r in rows], None)
    b.set(xscale="log", xlabel="unique training tokens", ylabel=f"tau, chains of {rows[0]['tau_k']}")
    how = f"{epochs:g} epoch each" if epochs is not None else f"{rows[0]['steps']} steps each"
    projected = "; dashed: log-linear projection" if len(x) >= 2 and far[1] > far[0] else ""
    fig.suptitle(f"SmolLM2-135M EAGLE-3 head on ShareGPT: data scaling ({how}{projected})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmspec.zoo.train_smollm2_sharegpt", description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=["features", "head", "self", "finetune", "tau", "drafter", "blockwise",
                                      "scaling"])
    p.add_argument("--cache", type=Path, default=None, help="feature cache (default ~/.cache/mmspec/sharegpt/smollm2)")
    p.add_argument("--tokens", type=float, default=None,
                   help="features: stop at this many tokens (10.5e6); head: train on the first shards up to it")
    p.add_argument("--minutes", type=float, default=55.0)
    p.add_argument("--cache-gb", type=float, default=50.0)
    p.add_argument("--autocast", choices=["none", "bfloat16"], default="none",
                   help="features: the target's forwards under CPU bf16 autocast (4x faster with AMX; the cache "
                        "folder records it); head, scaling: the head's training steps under it")
    p.add_argument("--sizes", type=float, nargs="+", default=[2.5e5, 5e5, 1e6, 2e6],
                   help="scaling: training-data sizes in tokens (one head each)")
    p.add_argument("--epochs", type=float, default=None,
                   help="scaling: each head passes over its data this often (default: every head runs --steps)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"head, finetune, drafter, blockwise: steps of the schedule (default {HEAD.loop.steps}, "
                        f"{FINETUNE.loop.steps}, {DRAFTER_STEPS}, {BLOCKWISE_STEPS})")
    p.add_argument("--draft-vocab", type=int, default=None,
                   help=f"head: draft vocabulary size (default {HEAD.draft_vocab_size}); finetune: replace the "
                        "initial head's by the data's most frequent tokens (default: keep it)")
    p.add_argument("--batch-size", type=int, default=HEAD.batch_size, help="head: windows of 512 tokens a step")
    p.add_argument("--out", type=Path, default=None, help="head: run directory")
    p.add_argument("--prompts", type=int, default=8, help="tau: dev-split first turns to decode")
    p.add_argument("--compare", type=Path, nargs="*", default=[], help="tau: more head folders, interleaved with --out")
    p.add_argument("--init", type=Path, default=None, help="finetune: the head to start from")
    p.add_argument("--data", choices=["self", "fixed"], default="self",
                   help="finetune: the target's own answers (stage self) or ShareGPT's fixed answers (stage features)")
    a = p.parse_args(argv)
    cache = a.cache or default_cache()
    if a.stage == "features":
        index = features(cache, a.tokens or 10.5e6, a.minutes, a.cache_gb,
                         None if a.autocast == "none" else a.autocast)
        done = sum(s["tokens"] for s in index["shards"])
        print(f"{done:,} tokens in {len(index['shards'])} shards ({index['stopped']}); "
              f"{index.get('tokens_per_s')} tokens/s")
    elif a.stage == "self":
        print(json.dumps(self_answers(cache, a.minutes), indent=2))
    elif a.stage == "finetune":
        if a.out is None or a.init is None:
            p.error("stage finetune needs --out and --init")
        print(json.dumps(finetune(cache, a.out, a.init, a.steps or FINETUNE.loop.steps, a.minutes, a.data,
                                  a.draft_vocab), indent=2))
    elif a.stage in ("drafter", "blockwise"):
        if a.out is None:
            p.error(f"stage {a.stage} needs --out")
        fn, steps = (model_drafter, DRAFTER_STEPS) if a.stage == "drafter" else (blockwise, BLOCKWISE_STEPS)
        print(json.dumps(fn(cache, a.out, a.tokens or math.inf, a.steps or steps, a.minutes), indent=2))
    elif a.stage == "scaling":
        if a.out is None:
            p.error("stage scaling needs --out")
        print(json.dumps(scaling(cache, a.out, sorted(a.sizes), a.steps or HEAD.loop.steps, a.minutes,
                                 a.draft_vocab or HEAD.draft_vocab_size, None if a.autocast == "none" else a.autocast,
                                 a.prompts, a.epochs), indent=2))
    elif a.stage == "tau":
        if a.out is None:
            p.error("stage tau needs --out")
        print(json.dumps(tau([a.out, *a.compare], prompts=a.prompts), indent=2))
    else:
        if a.out is None:
            p.error("stage head needs --out")
        summary = head(cache, a.out, a.tokens or math.inf, a.steps or HEAD.loop.steps, a.minutes,
                       a.draft_vocab or HEAD.draft_vocab_size, a.batch_size, None if a.autocast == "none" else a.autocast)
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

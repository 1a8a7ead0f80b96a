"""Test-Time Speculation on SmolLM2-135M-Instruct under a domain shift: τ against output position, net speed.

Run from the repository root::

    python -m benchmarks.tts --out benchmarks/RESULTS.md --plots benchmarks   # full run (~15 min on 2 cores)
    python -m benchmarks.tts --quick                                           # smoke run

The shipped EAGLE-3 head was trained on chat answers. Here the target continues Python source code (the
first ``--prompt-tokens`` tokens of standard-library modules, no chat template): another domain and another
format. Every method continues every prompt greedily for ``--new-tokens`` tokens (EOS off, so every run
is equally long), prompt by prompt, the methods in an order rotated from prompt to prompt; every output is
checked token for token against plain AR's.

Glossary:
    AR          plain greedy decoding of the target on the one loop (no drafter)
    head        the shipped head drafting chains of k tokens, weights fixed
    prompt lookup  HF's n-gram lookup in the context (mmspec's loop): the baseline that profits from any
                repetition in the continuation
    head + TTS  the same head wrapped in :class:`~mmspec.drafters.test_time_speculation.TTSDrafter`
                (``all``: every head weight; ``lora``: rank-8 adapters), one update every 4 steps on the
                last 64 verified positions
    τ           tokens emitted per target forward (per step), overall and per bin of output positions
    update      the share of wall time the TTS updates took
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from mmspec.distill.train_domain import render_man_page

SECTION = "## Test-Time Speculation on SmolLM2 under a domain shift (issue 16)"
MODULES = ("textwrap", "json.decoder", "argparse", "fractions", "shlex", "string")


def code_prompts(tokenizer, count: int, length: int) -> list[torch.Tensor]:
    """The first ``length`` tokens of ``count`` standard-library modules' source (text on this machine)."""
    import importlib
    import inspect

    out = []
    for name in MODULES[:count]:
        src = inspect.getsource(importlib.import_module(name))
        ids = tokenizer(src, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :length]
        out.append(ids)
    return out


MAN_PAGES = ("dpkg-deb", "dpkg-query", "dpkg-source", "apt-transport-http", "dpkg-split", "dpkg-divert")


def german_prompts(tokenizer, count: int, length: int) -> list[torch.Tensor]:
    """The first ``length`` tokens of ``count`` German man pages (Debian's translations on this machine): prose
    in another language, where the chat-trained head meets text it has never seen."""
    root = Path("/usr/share/man/de")
    out = []
    for name in MAN_PAGES:
        hits = sorted(root.glob(f"man*/{name}.*.gz"))
        if not hits:
            continue
        text = " ".join(render_man_page(hits[0]).split())  # one paragraph: no layout whitespace to copy
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :length]
        out.append(ids)
        if len(out) == count:
            break
    if len(out) < count:
        raise SystemExit(f"only {len(out)} German man pages found under {root}, {count} asked for")
    return out


def main(argv: list[str] | None = None) -> int:
    from mmspec import engine
    from mmspec.drafters.test_time_speculation import TTSConfig, TTSDrafter
    from mmspec.pretrained import load_causal_lm
    from mmspec.zoo.smollm2 import load_smollm2_drafter

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=1024)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--bin", type=int, default=128, help="output positions per τ bin")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (outputs checked against AR)")
    ap.add_argument("--domain", choices=["code", "german"], default="code",
                    help="code: standard-library source; german: German man pages (prose in another language)")
    ap.add_argument("--section", default=SECTION, help="the RESULTS.md section heading to (re)write")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plots", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.new_tokens, args.bin = 1, 64, 32
    torch.set_num_threads(2)
    load = os.getloadavg()[0]
    target, tok = load_causal_lm()
    prompts = (code_prompts if args.domain == "code" else german_prompts)(tok, args.prompts, args.prompt_tokens)
    sources = (", ".join(MODULES[:len(prompts)]) + " (standard-library source" if args.domain == "code"
               else ", ".join(MAN_PAGES[:len(prompts)]) + " (German man pages, rendered to one paragraph")
    head = load_smollm2_drafter("head", target, draft_length=args.k)
    methods = {
        "AR": lambda: None,
        "prompt lookup": lambda: "prompt_lookup",
        "head": lambda: load_smollm2_drafter("head", target, draft_length=args.k),
        "head + TTS (all)": lambda: TTSDrafter(head, TTSConfig(update_every=4, window=64, lr=3e-4)),
        "head + TTS (lora)": lambda: TTSDrafter(head, TTSConfig(update_every=4, window=64, lr=1e-3, params="lora")),
    }
    names = list(methods)
    times = {n: 0.0 for n in names}
    steps = {n: [] for n in names}  # (position before the step, tokens emitted by the step)
    update_time = {n: 0.0 for n in names}
    outputs = {n: [] for n in names}
    for i, ids in enumerate(prompts):
        order = names[i % len(names):] + names[: i % len(names)]
        for n in order:
            drafter = methods[n]()
            pos = 0
            t0 = time.perf_counter()
            for ev in engine.generate_stream(target, ids, drafter=drafter, max_new_tokens=args.new_tokens,
                                             num_draft_tokens=args.k, eos_token_id=[], temperature=args.temperature,
                                             seed=[1000 + i]):
                m = len(ev.tokens[0])
                steps[n].append((pos, m))
                pos += m
                outputs[n].append(ev.tokens[0])
            times[n] += time.perf_counter() - t0
            if hasattr(drafter, "update_time"):
                update_time[n] += drafter.update_time
            print(f"prompt {i} {n}: {pos} tokens, {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    flat = {n: [t for chunk in outputs[n] for t in chunk] for n in names}
    identical = all(flat[n] == flat["AR"] for n in names) if args.temperature == 0 else "n/a (sampled)"
    # how repetitive the continuations are: generated 4-grams already seen earlier in prompt + output
    seen = total = 0
    per = len(flat["AR"]) // len(prompts)
    for i, ids in enumerate(prompts):
        seq = ids[0].tolist() + flat["AR"][i * per:(i + 1) * per]
        grams: set = set()
        for j in range(len(seq) - 3):
            g = tuple(seq[j:j + 4])
            if j >= ids.shape[1] - 3:
                total += 1
                seen += g in grams
            grams.add(g)
    repeated = seen / max(total, 1)

    bins = list(range(0, args.new_tokens, args.bin))

    def tau(n: str, lo: int = 0, hi: int = 1 << 30) -> float:
        sel = [m for p, m in steps[n] if lo <= p < hi]
        return sum(sel) / max(len(sel), 1)

    rows = []
    for n in names:
        tokens = sum(m for _, m in steps[n])
        share = update_time[n] / times[n] if times[n] else 0.0
        first, last = tau(n, 0, bins[1] if len(bins) > 1 else args.new_tokens), tau(n, bins[-1])
        rows.append(f"| {n} | {tokens / times[n]:.2f} | x{times['AR'] / times[n]:.2f} | {tau(n):.2f} | "
                    f"{first:.2f} | {last:.2f} | {'–' if n == 'AR' else f'{share:.1%}'} |")
    base = tau("head")
    gains = {n: tau(n) / base - 1 for n in names if n.startswith("head + TTS")}  # vs the fixed head
    late = {n: tau(n, args.new_tokens // 2) / max(tau("head", args.new_tokens // 2), 1e-9) - 1 for n in gains}
    bin_head = "| method | " + " | ".join(f"{b}–{b + args.bin - 1}" for b in bins) + " |"
    bin_rows = [bin_head, "|---|" + "---|" * len(bins)]
    for n in names[1:]:
        bin_rows.append(f"| {n} | " + " | ".join(f"{tau(n, b, b + args.bin):.2f}" for b in bins) + " |")
    cmd = "python -m benchmarks.tts " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    text = "\n".join([
        args.section, "",
        f"Command: `{cmd.strip()}` — {_dt.date.today()}, {platform.machine()} CPU ({torch.get_num_threads()} threads, "
        f"load average {load:.2f} at start), torch {torch.__version__}. {len(prompts)} prompts: the first "
        f"{args.prompt_tokens} tokens of {sources}, no chat "
        f"template; the head was trained on English chat answers), {args.new_tokens} tokens each ({'greedy' if args.temperature == 0 else f'sampled at temperature {args.temperature}'}, EOS off), k = "
        f"{args.k}, batch 1. Outputs identical to plain AR for every method: {identical}. {repeated:.0%} of the "
        "generated 4-grams had appeared earlier in the prompt or the output (how much an n-gram lookup can "
        "find).", "",
        "| method | tok/s | speedup vs AR | τ | τ first bin | τ last bin | TTS update share of time |",
        "|---|---|---|---|---|---|---|",
        *rows, "",
        "τ (tokens per target forward) by output position:", "",
        *bin_rows, "",
        "TTS gain in τ over the fixed head: " + ", ".join(f"{n}: {g:+.1%} overall, {late[n]:+.1%} in the second half"
                                                          for n, g in gains.items()) + ".", "",
    ]) + "\n"
    print(text)
    if args.out is not None and not args.quick:
        from ._report import write_section

        write_section(args.out, args.section, text)
    if args.plots is not None and not args.quick:
        from ._plots import _pyplot

        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for n in names[1:]:
            ax.plot([b + args.bin / 2 for b in bins], [tau(n, b, b + args.bin) for b in bins], marker="o", label=n)
        ax.set_xlabel("output position (tokens)")
        ax.set_ylabel("τ (tokens per target forward)")
        ax.set_title("SmolLM2 continuing " + ("Python source" if args.domain == "code" else "German prose"))
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        args.plots.mkdir(parents=True, exist_ok=True)
        suffix = ("" if args.domain == "code" else f"_{args.domain}") + ("" if args.temperature == 0 else f"_t{args.temperature:g}")
        fig.savefig(args.plots / f"tts_tau_by_position{suffix}.png", dpi=120)
    return 0 if identical in (True, "n/a (sampled)") else 1


if __name__ == "__main__":
    sys.exit(main())

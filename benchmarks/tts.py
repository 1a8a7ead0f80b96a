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

import sys
from pathlib import Path

import torch

from ._harness import Fresh, arg_parser, begin, interleave, md_table, provenance, report

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
    from mmspec.distill.train_domain import render_man_page

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

    ap = arg_parser("tts", __doc__, section=SECTION, plots="tts_tau_by_position*.png",
                    quick={"prompts": 1, "new_tokens": 64, "bin": 32})
    ap.add_argument("--prompts", type=int, default=3, help="standard-library modules (or German man pages)")
    ap.add_argument("--prompt-tokens", type=int, default=256, help="tokens of each document in its prompt")
    ap.add_argument("--new-tokens", type=int, default=1024, help="continued per prompt (EOS off)")
    ap.add_argument("--k", type=int, default=4, help="draft length of the head")
    ap.add_argument("--bin", type=int, default=128, help="output positions per τ bin")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (outputs checked against AR)")
    ap.add_argument("--domain", choices=["code", "german"], default="code",
                    help="code: standard-library source; german: German man pages (prose in another language)")
    args = ap.parse_args(argv)
    load_before = begin(2)
    target, tok = load_causal_lm()
    prompts = (code_prompts if args.domain == "code" else german_prompts)(tok, args.prompts, args.prompt_tokens)
    sources = (", ".join(MODULES[:len(prompts)]) + " (standard-library source" if args.domain == "code"
               else ", ".join(MAN_PAGES[:len(prompts)]) + " (German man pages, rendered to one paragraph")
    head = load_smollm2_drafter("head", target, draft_length=args.k)

    def run(ids, seed, drafter) -> dict:
        """Stream one continuation: the steps as (position before the step, tokens it emitted), the tokens, and
        the TTS update seconds."""
        pos, steps, tokens = 0, [], []
        for ev in engine.generate_stream(target, ids, drafter=drafter, max_new_tokens=args.new_tokens,
                                         num_draft_tokens=args.k, eos_token_id=[], temperature=args.temperature,
                                         seed=[seed]):
            m = len(ev.tokens[0])
            steps.append((pos, m))
            pos += m
            tokens += ev.tokens[0]
        return {"steps": steps, "tokens": tokens, "update": getattr(drafter, "update_time", 0.0)}

    methods = {
        "AR": Fresh(lambda: None, run),
        "prompt lookup": Fresh(lambda: "prompt_lookup", run),
        "head": Fresh(lambda: load_smollm2_drafter("head", target, draft_length=args.k), run),
        "head + TTS (all)": Fresh(lambda: TTSDrafter(head, TTSConfig(update_every=4, window=64, lr=3e-4)), run),
        "head + TTS (lora)": Fresh(lambda: TTSDrafter(head, TTSConfig(update_every=4, window=64, lr=1e-3,
                                                                      params="lora")), run),
    }
    names = list(methods)
    runs = interleave(methods, prompts, label=f"tts {args.domain}")
    times = {n: runs.total(n) for n in names}
    steps = {n: [st for r in runs.results(n) for st in r["steps"]] for n in names}
    update_time = {n: sum(r["update"] for r in runs.results(n)) for n in names}
    per_prompt = {n: {c.index: c.result["tokens"] for c in runs.of(n)} for n in names}
    identical = all(per_prompt[n] == per_prompt["AR"] for n in names) if args.temperature == 0 else "n/a (sampled)"
    # how repetitive the continuations are: generated 4-grams already seen earlier in prompt + output
    seen = total = 0
    for i, ids in enumerate(prompts):
        seq = ids[0].tolist() + per_prompt["AR"][i]
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
        rows.append([n, f"{tokens / times[n]:.2f}", f"x{times['AR'] / times[n]:.2f}", f"{tau(n):.2f}", f"{first:.2f}",
                     f"{last:.2f}", "–" if n == "AR" else f"{share:.1%}"])
    base = tau("head")
    gains = {n: tau(n) / base - 1 for n in names if n.startswith("head + TTS")}  # vs the fixed head
    late = {n: tau(n, args.new_tokens // 2) / max(tau("head", args.new_tokens // 2), 1e-9) - 1 for n in gains}
    bin_rows = md_table(["method", *(f"{b}–{b + args.bin - 1}" for b in bins)],
                        ([n, *(f"{tau(n, b, b + args.bin):.2f}" for b in bins)] for n in names[1:]))
    text = "\n".join([
        args.section, "",
        f"{provenance('tts', argv, load_before)} {len(prompts)} prompts: the first "
        f"{args.prompt_tokens} tokens of {sources}, no chat "
        f"template; the head was trained on English chat answers), {args.new_tokens} tokens each ({'greedy' if args.temperature == 0 else f'sampled at temperature {args.temperature}'}, EOS off), k = "
        f"{args.k}, batch 1. Outputs identical to plain AR for every method: {identical}. {repeated:.0%} of the "
        "generated 4-grams had appeared earlier in the prompt or the output (how much an n-gram lookup can "
        "find).", "",
        *md_table(["method", "tok/s", "speedup vs AR", "τ", "τ first bin", "τ last bin", "TTS update share of time"],
                  rows), "",
        "τ (tokens per target forward) by output position:", "",
        *bin_rows, "",
        "TTS gain in τ over the fixed head: " + ", ".join(f"{n}: {g:+.1%} overall, {late[n]:+.1%} in the second half"
                                                          for n, g in gains.items()) + ".", "",
    ]) + "\n"
    report(text, args.out, args.section)
    if args.plots is not None:
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

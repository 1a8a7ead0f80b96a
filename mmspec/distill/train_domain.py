"""Adapting a causal LM to another domain with LoRA: the domain model of collaborative decoding.

Paper: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022), through peft.

Glossary:
    domain corpus  text of one domain found on this machine, tokenized into one stream: ``"code"`` = Python
                   standard-library sources, ``"german"`` = Debian's German man pages as plain text; the
                   sources the benchmarks prompt with are held out (``HELD_OUT``)
    window         ``seq_len`` consecutive tokens of the stream; a batch is ``batch_size`` windows at offsets
                   drawn from (seed, step), so a rerun continues with the same batches
    held-out loss  next-token cross-entropy on windows of the held-out sources, before and after training
    run dir        ``out/train_state.pt`` (the loop's checkpoint: adapter + optimiser + step, and the
                   config) while training, a rerun continues; finished: ``out/adapter_model.safetensors`` +
                   ``adapter_config.json`` (peft) + ``domain_info.json``; :func:`load_domain_model` merges the
                   adapter into a base model
    loop           :func:`mmspec.distill.loop.train_loop` with ``DomainTraining.loop``: warm-up + cosine to
                   10 %, AdamW betas (0.9, 0.95) without weight decay, gradient norm clipped to 1, a save every
                   10 steps

peft is imported inside the two functions that use it: it takes seconds to import, and
:mod:`mmspec.zoo.smollm2` imports this module for :func:`load_domain_model` alone.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import shutil
import subprocess
import sysconfig
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..pretrained import load_causal_lm
from .loop import LoopConfig, Weights, step_seed, train_loop

DOMAINS = ("code", "german")
#: sources the benchmarks prompt with (never trained on)
HELD_OUT = {"code": ("textwrap", "json/decoder", "argparse", "fractions", "shlex", "string", "heapq", "bisect"),
            "german": ("dpkg-deb", "dpkg-query", "dpkg-source", "apt-transport-http", "dpkg-split", "dpkg-divert")}


@dataclass(frozen=True)
class DomainTraining:
    rank: int = 16
    alpha: int = 32
    seq_len: int = 128
    batch_size: int = 8
    max_chars: int = 3_000_000  # corpus text read (enough for far more tokens than the schedule uses)
    seed: int = 0
    loop: LoopConfig = LoopConfig(steps=300, lr=4e-4, warmup=10, schedule="cosine", betas=(0.9, 0.95),
                                  weight_decay=0.0, clip_norm=1.0, save_every=10)


def domain_texts(domain: str, *, held_out: bool = False, max_chars: int = 3_000_000) -> list[str]:
    """The domain's documents on this machine (``held_out``: only the benchmarks' sources, else all others)."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    keep = HELD_OUT[domain]
    texts, total = [], 0
    if domain == "code":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts
                       and "idlelib" not in p.parts)
        for path in files:
            name = path.relative_to(root).with_suffix("").as_posix()
            if (name in keep) != held_out:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            texts.append(text)
            total += len(text)
            if total >= max_chars:
                break
    else:
        root = Path("/usr/share/man/de")
        for path in sorted(root.glob("man*/*.gz")):
            name = path.name.split(".")[0]
            if (name in keep) != held_out:
                continue
            text = " ".join(render_man_page(path).split())
            if text:
                texts.append(text)
                total += len(text)
            if total >= max_chars:
                break
    if not texts:
        raise FileNotFoundError(f"no {domain} text found on this machine")
    return texts


def render_man_page(path: str | Path) -> str:
    """A gzipped man page as plain text: ``man -l`` when the machine has it, else the troff source with its
    requests and font escapes stripped."""
    if shutil.which("man"):
        out = subprocess.run(["man", "-l", str(path)], capture_output=True, text=True,
                             env={**os.environ, "MANWIDTH": "100", "MAN_KEEP_FORMATTING": "0"})
        if out.returncode == 0 and out.stdout.strip():
            return re.sub(r".\x08", "", out.stdout)
    src = gzip.open(path, "rt", errors="replace").read()
    lines = [ln for ln in src.splitlines() if not ln.startswith((".", "'"))]
    text = re.sub(r"\\f[BIRP]|\\&|\\-", lambda m: "-" if m.group(0).endswith("-") else "", "\n".join(lines))
    return re.sub(r"\\\(:([aouAOU])", r"\1e", text)


def token_stream(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """long [N]: the documents' tokens, separated by EOS."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    parts = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        parts.append(torch.tensor(ids + [eos], dtype=torch.long))
    return torch.cat(parts)


def _windows(stream: torch.Tensor, offsets: list[int], length: int) -> torch.Tensor:
    return torch.stack([stream[o: o + length] for o in offsets])


@torch.no_grad()
def heldout_loss(model: Any, stream: torch.Tensor, length: int, count: int = 16) -> float:
    """Mean next-token cross-entropy on ``count`` evenly spaced windows of ``stream``."""
    step = max(1, (stream.numel() - length - 1) // count)
    batch = _windows(stream, [i * step for i in range(count) if i * step + length <= stream.numel()], length)
    was = model.training
    model.eval()
    loss = float(model(input_ids=batch, labels=batch).loss)
    model.train(was)
    return loss


def train_domain_lora(model: Any, tokenizer: Any, domain: str, out_dir: str | Path, *,
                      config: DomainTraining = DomainTraining(), minutes: float = float("inf"),
                      progress: bool = True) -> dict:
    """LoRA-adapt ``model`` (a HF causal LM, changed in place: adapters are injected) to ``domain``; resumable.
    Returns a summary (steps, held-out loss before/after)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict, get_peft_model_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stream = token_stream(tokenizer, domain_texts(domain, max_chars=config.max_chars))
    held = token_stream(tokenizer, domain_texts(domain, held_out=True))
    base_loss = heldout_loss(model, held, config.seq_len)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                                                  target_modules=targets, task_type="CAUSAL_LM"))

    def loss_fn(step: int) -> torch.Tensor:
        g = random.Random(step_seed(config.seed, step))
        offsets = [g.randrange(stream.numel() - config.seq_len) for _ in range(config.batch_size)]
        batch = _windows(stream, offsets, config.seq_len)
        return peft_model(input_ids=batch, labels=batch).loss

    weights = Weights(lambda: get_peft_model_state_dict(peft_model),
                      lambda sd: set_peft_model_state_dict(peft_model, sd))
    res = train_loop(f"LoRA on {domain}", peft_model, loss_fn, config.loop, out / "train_state.pt", minutes=minutes,
                     progress=progress, weights=weights, extra={"config": asdict(config)})
    summary = {"domain": domain, "steps": res.steps_done, "finished": res.finished, "train_loss_ema": res.final_loss,
               "heldout_loss_base": round(base_loss, 4), "heldout_loss": round(heldout_loss(peft_model, held, config.seq_len), 4),
               "train_tokens": int(stream.numel()), "config": asdict(config)}
    peft_model.save_pretrained(out)
    _to_half(out / "adapter_model.safetensors")
    (out / "README.md").unlink(missing_ok=True)  # peft's model-card template
    (out / "domain_info.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _to_half(path: Path) -> None:
    """Store the adapter in float16 (half the size; merged into the base in its own dtype)."""
    save_file({k: v.half().contiguous() for k, v in load_file(str(path)).items()}, str(path))


def load_domain_model(folder: str | Path, base: Any) -> Any:
    """``base`` (a freshly loaded HF causal LM, changed in place) with the LoRA adapter in ``folder`` merged:
    a plain HF model of the base's architecture."""
    from peft import PeftModel

    folder = Path(folder)
    if not (folder / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"no domain adapter at {folder} (adapter_model.safetensors missing)")
    return PeftModel.from_pretrained(base, folder).merge_and_unload().eval()


def main(argv: list[str] | None = None) -> int:
    """``python -m mmspec.distill.train_domain --domain code --out DIR``: LoRA-adapt SmolLM2 (or ``--base``)."""
    ap = argparse.ArgumentParser(prog="python -m mmspec.distill.train_domain", description=main.__doc__)
    ap.add_argument("--domain", choices=DOMAINS, required=True)
    ap.add_argument("--out", required=True, help="run directory (a rerun continues)")
    ap.add_argument("--base", default="smollm2", help="the model to adapt (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--steps", type=int, default=DomainTraining.loop.steps)
    args = ap.parse_args(argv)
    model, tokenizer = load_causal_lm(args.base)
    config = DomainTraining(loop=replace(DomainTraining.loop, steps=args.steps))
    summary = train_domain_lora(model, tokenizer, args.domain, args.out, minutes=args.minutes, config=config)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

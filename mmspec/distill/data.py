"""Self-distillation data for drafters: the target's own answers to chat prompts made from text that is
on every machine with Python (the standard library's docstrings), with the target's features.

Paper: Li et al., EAGLE-3 (arXiv 2503.01840) trains on the target's own responses; so does
Medusa-2's self-distillation (Cai et al., ICML 2024).

Glossary:
    prompt bank   chat prompts built from stdlib docstrings (explain / summarise / example / story
                  templates), deterministic for a seed; held-out benchmark prompts are written
                  elsewhere (``benchmarks``) and never come from here
    example       one conversation: ``tokens`` long [L] (chat prompt + the target's answer),
                  ``loss_mask`` bool [L] (True on answer positions), ``features`` bfloat16 [L, 3, d]
                  (the target's hidden states at the head's three layers), ``final`` bfloat16 [L, d]
                  (the target's last, normed hidden state: the teacher's logits are
                  ``final @ lm_head.T``, restricted to the draft vocabulary at training time)
    shard         ``shard_XXXXX.pt``: a list of examples; a run writes shards one batch at a time
                  and a later run with the same arguments continues after the last shard
    forced shard  ``forced_XXXXX.pt``: teacher-forced examples whose answers are stdlib documentation
                  rather than the target's own text (one forward per batch instead of generation: on a
                  CPU the target generates about 40 tokens/s, so self-distillation alone is scarce)
"""

from __future__ import annotations

import inspect
import pkgutil
import random
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from ..heads.eagle3 import feature_layers
from ..pretrained import chat_inputs

_TEMPLATES = (
    "Explain in simple terms what this means: {s}",
    "Summarize the following text in two sentences: {p}",
    "Write a short Python example that uses {m}.{f} and explain it.",
    "What is {m}.{f} used for?",
    "Rewrite this sentence so that a beginner understands it: {s}",
    "Give three tips for someone who works with {w}.",
    "Write a short story about a {w}.",
    "What is a {w}? Answer in a few sentences.",
    "Write a friendly email asking a colleague about {w}.",
    "List the pros and cons of {w}.",
)

_WORD = re.compile(r"^[a-z]{4,12}$")


def _docstrings(limit_modules: int = 400) -> list[tuple[str, str, str]]:
    """(module, function, docstring) from the standard library (no imports with side effects)."""
    out = []
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names
                   and not m.name.startswith("_") and m.name not in {"antigravity", "this", "idlelib", "tkinter", "turtle",
                                                                      "turtledemo", "pydoc", "webbrowser"})
    for name in names[:limit_modules]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = __import__(name)
        except Exception:  # noqa: BLE001 - platform-specific modules
            continue
        for fname, obj in vars(mod).items():
            if fname.startswith("_") or not callable(obj):
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                doc = inspect.getdoc(obj)
            if doc and len(doc) > 40:
                out.append((name, fname, doc))
    return out


def prompt_bank(num: int, seed: int = 0) -> list[str]:
    """``num`` chat prompts built from stdlib docstrings (deterministic for ``seed``)."""
    rng = random.Random(seed)
    docs = _docstrings()
    words = sorted({w for _, _, d in docs for w in re.findall(r"[a-z]+", d.lower()) if _WORD.match(w)})
    prompts = []
    while len(prompts) < num:
        m, f, doc = rng.choice(docs)
        paragraphs = [p.replace("\n", " ").strip() for p in doc.split("\n\n") if len(p) > 40]
        p = rng.choice(paragraphs) if paragraphs else doc.replace("\n", " ")
        s = re.split(r"(?<=[.!?])\s", p)[0]
        prompts.append(rng.choice(_TEMPLATES).format(s=s[:300], p=p[:600], m=m, f=f, w=rng.choice(words)))
    return prompts


#: the values ``autocast`` takes where training data or steps may run under CPU autocast (None: float32)
AUTOCASTS = (None, "bfloat16")


def cpu_autocast(autocast: str | None):
    """The CPU autocast context for ``autocast`` (None: disabled); a value outside :data:`AUTOCASTS` is an error."""
    if autocast not in AUTOCASTS:
        raise ValueError(f"autocast must be None or 'bfloat16', got {autocast!r}")
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None)


@torch.no_grad()
def target_features(model: Any, tokens: torch.Tensor, mask: torch.Tensor, layers: tuple[int, ...],
                    dtype: torch.dtype = torch.bfloat16):
    """One teacher-forced forward: (features [B, L, 3, d], final [B, L, d]) stored in ``dtype`` (bfloat16: half the
    bytes of float32 with its range, where float16 turns a residual stream of 65,000 into inf)."""
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    kwargs = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=tokens, attention_mask=mask, position_ids=pos, output_hidden_states=True, **kwargs)
    hs = out.hidden_states
    return torch.stack([hs[i] for i in layers], dim=2).to(dtype), hs[-1].to(dtype)


@torch.no_grad()
def generate_examples(model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int = 160,
                      temperature: float = 0.0, seed: int = 0) -> list[dict]:
    """The target's answers to ``prompts`` (one batch) and its features along prompt + answer."""
    enc = chat_inputs(tokenizer, prompts)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    torch.manual_seed(seed)
    eos = model.generation_config.eos_token_id
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                         top_p=None, top_k=None, pad_token_id=eos)
    answer = gen[:, ids.shape[1]:]
    eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
    ans_mask = torch.ones_like(answer)
    for b in range(answer.shape[0]):  # keep the first EOS, drop what follows
        row = answer[b].tolist()
        cut = next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))
        ans_mask[b, cut:] = 0
    full_mask = torch.cat([mask, ans_mask], dim=1)
    layers = feature_layers(model.config.num_hidden_layers)
    feats, final = target_features(model, gen, full_mask, layers)
    examples = []
    for b in range(gen.shape[0]):
        keep = full_mask[b].bool()
        loss_mask = torch.cat([torch.zeros(ids.shape[1], dtype=torch.bool), ans_mask[b].bool()])[keep]
        examples.append({"tokens": gen[b][keep].clone(), "loss_mask": loss_mask,
                         "features": feats[b][keep].clone(), "final": final[b][keep].clone()})
    return examples


def build_dataset(model: Any, tokenizer: Any, out_dir: str | Path, *, num_prompts: int = 512, batch_size: int = 16,
                  max_new_tokens: int = 160, seed: int = 0, minutes: float = float("inf"),
                  progress: bool = True, prompts: list[str] | None = None) -> Path:
    """Write shards of self-distillation examples to ``out_dir`` (resumable; every other batch sampled
    at temperature 0.7 for variety, the rest greedy); stops after ``minutes`` with what it has. ``prompts``:
    the prompts to answer (default: ``num_prompts`` of :func:`prompt_bank`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = prompt_bank(num_prompts, seed) if prompts is None else prompts
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    t0 = time.time()
    bar = tqdm(total=len(batches), desc="self-distillation", unit="batch", disable=not progress)
    for i, batch in enumerate(batches):
        shard = out / f"shard_{i:05d}.pt"
        if not shard.exists():
            if (time.time() - t0) / 60 > minutes:
                break
            temperature = 0.7 if i % 2 else 0.0
            ex = generate_examples(model, tokenizer, batch, max_new_tokens=max_new_tokens,
                                   temperature=temperature, seed=seed * 100003 + i)
            tmp = shard.with_suffix(".tmp")
            torch.save(ex, tmp)
            tmp.rename(shard)
        bar.update(1)
    bar.close()
    return out


_ASK = ("Explain the following documentation.", "What does this part of the documentation say?",
        "Tell me about this.", "Describe it in your own words.")


@torch.no_grad()
def forced_examples(model: Any, tokenizer: Any, texts: list[str], *, seed: int = 0, max_len: int = 256) -> list[dict]:
    """Teacher-forced conversations: a question, and ``texts`` as the assistant's answers (the target's
    features and distributions along text it did not write; cheap: one forward, no generation)."""
    rng = random.Random(seed)
    convs = []
    for text in texts:
        q = rng.choice(_ASK)
        prompt = chat_inputs(tokenizer, [q])["input_ids"][0]
        answer = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        tokens = torch.cat([prompt, answer])[:max_len]
        convs.append((tokens, torch.arange(tokens.shape[0]) >= prompt.shape[0]))
    width = max(t.shape[0] for t, _ in convs)
    ids = torch.zeros((len(convs), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, (t, _) in enumerate(convs):
        ids[b, : t.shape[0]] = t
        mask[b, : t.shape[0]] = 1
    feats, final = target_features(model, ids, mask, feature_layers(model.config.num_hidden_layers))
    return [{"tokens": t, "loss_mask": lm, "features": feats[b, : t.shape[0]].clone(), "final": final[b, : t.shape[0]].clone()}
            for b, (t, lm) in enumerate(convs)]


def build_forced_dataset(model: Any, tokenizer: Any, out_dir: str | Path, *, num_texts: int = 2048,
                         batch_size: int = 16, seed: int = 0, minutes: float = float("inf"),
                         progress: bool = True) -> Path:
    """Shards ``forced_XXXXX.pt`` of teacher-forced stdlib documentation (resumable, stops after ``minutes``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 1)
    texts = [d for _, _, d in _docstrings() if len(d) > 200]
    rng.shuffle(texts)
    texts = texts[:num_texts]
    batches = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
    t0 = time.time()
    for i, batch in enumerate(tqdm(batches, desc="teacher-forced docs", unit="batch", disable=not progress)):
        shard = out / f"forced_{i:05d}.pt"
        if shard.exists():
            continue
        if (time.time() - t0) / 60 > minutes:
            break
        tmp = shard.with_suffix(".tmp")
        torch.save(forced_examples(model, tokenizer, batch, seed=seed + i), tmp)
        tmp.rename(shard)
    return out


def load_examples(data_dir: str | Path) -> list[dict]:
    """Every example of a run directory: self-distilled (``shard_*``) and teacher-forced (``forced_*``)."""
    examples = []
    for pattern in ("shard_*.pt", "forced_*.pt"):
        for shard in sorted(Path(data_dir).glob(pattern)):
            examples.extend(torch.load(shard))
    return examples


def usable_examples(examples: list[dict], holdout: int, what: str) -> list[dict]:
    """The examples a trainer can score (at least 4 tokens, an answer token); more than ``holdout`` of them or
    a ``ValueError`` saying what could not be done (``what``: "train a head", ...)."""
    examples = [e for e in examples if e["tokens"].shape[0] >= 4 and bool(e["loss_mask"].any())]
    if len(examples) <= holdout:
        raise ValueError(f"need more than {holdout} usable examples to {what}, got {len(examples)}")
    return examples


def split_heldout(examples: list[dict], holdout: int, seed: int, what: str) -> tuple[list[dict], list[dict]]:
    """(held-out, training): the :func:`usable_examples`, ``holdout`` of them drawn for held-out scoring (a pure
    function of ``seed``)."""
    examples = usable_examples(examples, holdout, what)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order[:holdout]], [examples[i] for i in order[holdout:]]


def split_off_heldout(examples: list[dict], heldout_examples: list[dict] | None, holdout: int, seed: int,
                      what: str) -> tuple[list[dict], list[dict]]:
    """(held-out, training): ``heldout_examples`` when given (another split: every usable example of ``examples``
    trains), else :func:`split_heldout`."""
    if heldout_examples is not None:
        return list(heldout_examples), usable_examples(examples, 0, what)
    return split_heldout(examples, holdout, seed, what)


def iter_token_counts(examples: list[dict]) -> Iterator[torch.Tensor]:
    for ex in examples:
        yield ex["tokens"][ex["loss_mask"]]

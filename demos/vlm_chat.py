"""VLM chat demo: ask about an image; the answer streams token by token from ``mmspec.vision.generate_stream``.

Run::

    python -m demos.vlm_chat                                   # the scene VLM on SmolLM2, http://127.0.0.1:7860
    python -m demos.vlm_chat --target T --drafter D --port 8000   # any HF VLM checkpoints (same family)

Glossary:
    drafted    a token the drafter proposed and the target accepted (highlighted "drafted")
    target     a token the target produced itself: the correction after a rejection, or the bonus token
    speedup    wall time of plain AR (HF ``generate`` with the same settings) / wall time of mmspec,
               both measured on this request
    overlay    the image as the models see it; darkened cells are visual tokens the drafter did not keep

The demo holds no decoding logic: it validates input, calls the public streaming API and renders.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .common import check_prompt, checked_image, kept_overlay, launch, launch_parser, load_image, processed_image

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
PRUNING = ["verifier", "cls", "diversity", "uniform", "none"]
LABELS = {"drafted": "#f6c343", "target": "#4a90d9"}


@dataclass
class VLMSession:
    target: Any
    drafter: Any  # a drafter VLM, or an EAGLE-3 head over the target's features
    processor: Any
    max_new_tokens: int = 64
    chat: bool = False  # the processor has a chat template taking {"type": "image"} items (the scene VLM)


def load_session(target: str | None = None, drafter: str | None = None, processor: str | None = None) -> VLMSession:
    if target is None:  # the scene VLM on SmolLM2 with its EAGLE-3 head
        from mmspec.zoo.smollm2_llava import load_smollm2_vlm

        vlm = load_smollm2_vlm()
        return VLMSession(vlm.target, vlm.head, vlm.processor, chat=True)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    t = AutoModelForImageTextToText.from_pretrained(target, attn_implementation="sdpa").eval()
    d = AutoModelForImageTextToText.from_pretrained(drafter, attn_implementation="sdpa").eval() if drafter else t
    return VLMSession(t, d, AutoProcessor.from_pretrained(processor or target))


def build_inputs(session: VLMSession, image, question: str) -> dict:
    proc = session.processor
    image_token = getattr(proc, "image_token", "<image>")
    prompt = question if image_token in question else f"{image_token} {question}"
    try:
        if session.chat:
            from mmspec.zoo.smollm2_llava import vlm_inputs

            inputs = vlm_inputs(proc, [image], question)
        else:
            inputs = proc(images=image, text=prompt, return_tensors="pt")
    except Exception as exc:  # the processor's message names the problem
        from .common import limit_error

        raise limit_error(f"The processor cannot prepare this image/question: {exc}") from None
    dtype = next(session.target.parameters()).dtype
    return {k: (v.to(dtype) if torch.is_floating_point(v) else v) for k, v in inputs.items()}


def answer(session: VLMSession, image_path, question, pruning, keep_ratio, k, temperature):
    """Generator for the page: yields (highlighted tokens, stats markdown, overlay image)."""
    import mmspec.vision as mv

    image = load_image(image_path)
    question = check_prompt(question, what="question")
    inputs = build_inputs(session, image, question)
    n_prompt = inputs["input_ids"].shape[1]
    temperature, k = float(temperature), int(k)
    tok = session.processor.tokenizer
    pieces: list[tuple[str, str]] = []
    ids: list[int] = []
    text_so_far = ""
    t_spec = 0.0  # time inside the decoder only (not the page's rendering between steps)
    t0 = time.perf_counter()
    stream = mv.generate_stream(session.target, session.drafter, inputs, pruning=pruning, keep_ratio=float(keep_ratio),
                                max_new_tokens=session.max_new_tokens, num_draft_tokens=k, temperature=temperature,
                                generator=torch.Generator().manual_seed(0))
    t_spec += time.perf_counter() - t0
    stats = None
    overlay = None
    while True:
        t0 = time.perf_counter()
        ev = next(stream, None)
        t_spec += time.perf_counter() - t0
        if ev is None:
            break
        stats = ev.stats
        for j, t in enumerate(ev.tokens[0] if ev.rows and ev.rows[0] == 0 else []):
            ids.append(t)
            text = tok.decode(ids, skip_special_tokens=True)
            piece, text_so_far = text[len(text_so_far):], text
            if piece:
                pieces.append((piece, "drafted" if j < ev.num_accepted[0] else "target"))
        if overlay is None:
            overlay = _overlay(session, inputs, stats.extra)
        yield pieces, "*generating …*", overlay
    with torch.no_grad():
        t1 = time.perf_counter()
        kw = dict(do_sample=False) if temperature == 0 else dict(do_sample=True, temperature=temperature)
        ref = session.target.generate(**inputs, max_new_tokens=session.max_new_tokens, **kw)
        t_ar = time.perf_counter() - t1
    extra = stats.extra if stats else {}
    kept, total = extra.get("drafter_visual_tokens", ["?"])[0], extra.get("visual_tokens", ["?"])[0]
    same = ""
    if temperature == 0:
        same = "yes" if ref[0, n_prompt:].tolist() == ids else "**NO**"
        same = f"\n| identical to plain AR | {same} |"
    md = (f"| this request | |\n|---|---|\n| speedup over plain AR | **x{t_ar / max(t_spec, 1e-9):.2f}** |\n"
          f"| mmspec / plain AR time | {t_spec * 1000:.0f} ms / {t_ar * 1000:.0f} ms |\n"
          f"| mean accepted length | {stats.mean_accepted_length:.2f} |\n"
          f"| drafter visual tokens kept | {kept} of {total} ({pruning}) |\n"
          f"| tokens | {len(ids)} in {stats.steps} verification steps |{same}")
    yield pieces, md, overlay


def _overlay(session: VLMSession, inputs: dict, extra: dict):
    pix = inputs.get("pixel_values")
    kept = extra.get("drafter_kept_visual_indices")
    total = extra.get("visual_tokens")
    if pix is None or not kept or not total:
        return None
    img = processed_image(pix, session.processor.image_processor)
    return None if img is None else kept_overlay(img, kept[0], total[0], scale=max(1, 256 // img.width))


def example_images() -> list[str]:
    return sorted(str(p) for p in EXAMPLES_DIR.glob("*.png"))


def build_demo(session: VLMSession):
    import gradio as gr

    with gr.Blocks(title="mmspec — VLM speculative decoding") as demo:
        gr.Markdown("## mmspec VLM chat\nThe drafter sees a *pruned* subset of the image tokens and drafts; "
                    "the full target verifies, so the answer is exactly the target's. Ask about colours, shapes, "
                    "positions and counts. "
                    "<span style='background:#f6c343'>drafted & accepted</span> · "
                    "<span style='background:#4a90d9;color:white'>from the target</span>")
        with gr.Row():
            with gr.Column(scale=1):
                image = checked_image(type="filepath", label="image", elem_id="image", sources=["upload", "clipboard"])
                question = gr.Textbox(value="Describe the image.", label="question", elem_id="question", max_lines=3)
                with gr.Accordion("settings", open=True):
                    pruning = gr.Dropdown(PRUNING, value="verifier", label="pruning strategy", elem_id="pruning")
                    keep = gr.Slider(0.0, 1.0, value=0.25, step=0.05, label="keep ratio", elem_id="keep")
                    k = gr.Slider(1, 8, value=4, step=1, label="draft length k", elem_id="k")
                    temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.1, label="temperature (0 = greedy)",
                                            elem_id="temperature")
                run = gr.Button("Ask", variant="primary", elem_id="ask")
                gr.Examples(example_images(), inputs=image, label="examples (scenes and real photos)")
            with gr.Column(scale=1):
                out = gr.HighlightedText(label="answer", color_map=LABELS, combine_adjacent=False, show_legend=True,
                                         elem_id="answer")
                stats = gr.Markdown(elem_id="stats")
                overlay = gr.Image(label="visual tokens the drafter kept (dark = pruned)", elem_id="overlay",
                                   interactive=False, format="png")
        def on_ask(image_path, question_text, strategy, keep_ratio, draft_len, temp):
            yield from answer(session, image_path, question_text, strategy, keep_ratio, draft_len, temp)

        run.click(on_ask, [image, question, pruning, keep, k, temperature], [out, stats, overlay], api_name="answer")
    return demo


def main(argv: list[str] | None = None) -> int:
    p = launch_parser(__doc__.split("\n")[0])
    p.add_argument("--target", help="HF VLM checkpoint (default: the scene VLM on SmolLM2 with its EAGLE-3 head)")
    p.add_argument("--drafter", help="smaller VLM of the same family (default: the target itself)")
    p.add_argument("--processor", help="processor path (default: the target's)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    launch(build_demo(load_session(a.target, a.drafter, a.processor)), a.host, a.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

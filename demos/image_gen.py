"""Image-generation demo: a prompt (or class id) -> images by AR, exact SD, SJD, LANTERN, LANTERN++ or MuLo-SD,
next to plain AR from the same seed, with the per-token acceptance heat-map.

Run::

    python -m demos.image_gen                       # the zoo image models, http://127.0.0.1:7861
    python -m demos.image_gen --model M --tokenizer T --drafter D [--lowres L] --port 8001

Glossary:
    heat-map     per grid position, the fraction of images whose token there was drafted and accepted
                 (yellow) rather than sampled by the target (blue)
    forwards     target forward passes per image (plain AR: one per token)
    speedup      wall time of plain AR / wall time of the method, both on this request and seed

The demo holds no decoding logic: it validates input, calls ``mmspec.image_gen.generate`` and renders.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from mmspec.zoo.evaluate import DEFAULT_IMAGE_METHOD, IMAGE_SAMPLING, MULO_DEFAULT, distribution_verdict

from .common import check_prompt, launch, launch_parser, limit_error

from mmspec.image_gen.methods import METHOD_NAMES as METHODS  # noqa: E402  (the registry's names)
DEFAULT_PROMPT = "a red circle at the top left and a blue square at the bottom right"


@dataclass
class ImageSession:
    target: Any
    tokenizer: Any
    drafter: Any = None
    lowres: Any = None
    resampler: Any = None  # MuLo-SD's learned U_r / D_r (None: decode -> resize -> re-encode)
    neighbours: Any = None  # LANTERN's latent-neighbour table long [V, k] (None: built from the tokenizer's codebook)
    mulo_neighbours: Any = None  # MuLo-SD's (MULO_DEFAULT's neighbours)
    head: Any = None  # an EAGLE head over the target's hidden states (exact, LANTERN), or None
    max_images: int = 4
    zoo: bool = False  # the zoo's models: the recorded distribution verdicts apply


def load_session(model: str | None = None, tokenizer: str | None = None, drafter: str | None = None,
                 lowres: str | None = None) -> ImageSession:
    if model is None:
        from mmspec.zoo import load_default_image_models

        from mmspec.zoo import image_neighbours

        m = load_default_image_models()
        return ImageSession(m.target, m.tokenizer, m.drafter, m.lowres, m.resampler, image_neighbours(m, 8),
                            image_neighbours(m, MULO_DEFAULT["neighbours_k"]), m.head,
                            zoo=True)
    import mmspec.image_gen as ig

    if tokenizer is None:
        raise SystemExit("error: --tokenizer is required with --model (images are decoded by it)")
    target = ig.ARImageModel.from_pretrained(model)
    loaded = ig.load_image_drafter(drafter, target) if drafter else None  # an AR model or an EAGLE head
    is_model = isinstance(loaded, ig.ARImageModel)
    return ImageSession(target, ig.VQTokenizer.from_pretrained(tokenizer), loaded if is_model else None,
                        ig.ARImageModel.from_pretrained(lowres) if lowres else None,
                        head=None if is_model else loaded)


def _condition(session: ImageSession, prompt: str):
    if session.target.config.text_conditional:
        return check_prompt(prompt)
    text = (prompt or "").strip()
    if not text.lstrip("-").isdigit():
        raise limit_error(f"This model is class-conditional: enter a class id 0..{session.target.config.num_classes - 1}.")
    return int(text)


DRAFTERS = ("AR drafter", "EAGLE head")


def make_images(session: ImageSession, prompt, method, seed, num_images, cfg_scale, temperature, top_k, k,
                lantern_delta, lantern_lambda, mulo_delta, drafter="AR drafter"):
    """-> (method images, AR images, heat-map, stats markdown). ``drafter``: which of :data:`DRAFTERS` drafts for
    exact SD and LANTERN."""
    import mmspec
    import mmspec.image_gen as ig
    from mmspec.image_gen.heatmap import heatmap_image

    condition = _condition(session, prompt)
    if method not in METHODS:
        raise limit_error(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    n = int(num_images)
    if not 1 <= n <= session.max_images:
        raise limit_error(f"Number of images must be 1..{session.max_images}.")
    common = dict(condition=condition, num_images=n, cfg_scale=float(cfg_scale), temperature=float(temperature),
                  top_k=int(top_k) if top_k else None)
    spec = ig.METHODS[method]  # the registry says which drafter and parameters the method takes
    if drafter not in DRAFTERS:
        raise limit_error(f"Unknown drafter {drafter!r}; choose one of {', '.join(DRAFTERS)}.")
    same = session.head if drafter == "EAGLE head" else session.drafter
    model = {None: None, "same": same, "lowres": session.lowres}[spec.drafter]
    if spec.drafter is not None and model is None:
        flag = "--drafter" if spec.drafter == "same" else "--lowres"
        raise limit_error(f"Method {method!r} needs a {'low-resolution ' if spec.drafter == 'lowres' else ''}"
                          f"drafter model (start the demo with {flag}).")
    extra = spec.select(dict(drafter=model, num_draft_tokens=int(k), lantern_delta=float(lantern_delta),
                             lantern_lambda=float(lantern_lambda), mulo_delta=float(mulo_delta),
                             mulo_redraw=MULO_DEFAULT["mulo_redraw"],
                             mulo_resampler=session.resampler,
                             neighbours=session.mulo_neighbours if method == "mulo" else session.neighbours))

    def run(m, kw):
        t0 = time.perf_counter()
        out = ig.generate(session.target, session.tokenizer, method=m, generator=torch.Generator().manual_seed(int(seed)),
                          **common, **kw)
        return out, time.perf_counter() - t0

    try:
        with torch.no_grad():
            out, t_method = run(method, extra)
            ar, t_ar = run("ar", {}) if method != "ar" else (out, t_method)
    except mmspec.MMSpecError as exc:
        raise limit_error(str(exc)) from None
    st = out.stats
    big = [im.resize((192, 192), 0) for im in out.images]
    big_ar = [im.resize((192, 192), 0) for im in ar.images]
    md = (f"| | {method} | plain AR |\n|---|---|---|\n"
          f"| target forwards per image | **{st.target_forwards_per_image:.1f}** | {ar.stats.target_forwards_per_image:.1f} |\n"
          f"| wall time | {t_method * 1000:.0f} ms | {t_ar * 1000:.0f} ms |\n"
          f"| speedup over plain AR (this request) | **x{t_ar / max(t_method, 1e-9):.2f}** | x1.00 |\n"
          f"| mean accepted length | {st.mean_accepted_length:.2f} | 1.00 |\n"
          f"| tokens per target forward | {st.tokens_per_forward:.2f} | {ar.stats.tokens_per_forward:.2f} |")
    if session.zoo and method != "ar":  # what the benchmark measured for this method at the demo's defaults
        md += f"\n\n{distribution_verdict(method)}"
    return big, big_ar, heatmap_image(st.accepted_map, cell=12), md


def build_demo(session: ImageSession):
    import gradio as gr

    text_model = session.target.config.text_conditional
    with gr.Blocks(title="mmspec — image generation") as demo:
        gr.Markdown("## mmspec image generation\nSpeculative decoding of VQ image tokens. AR, exact SD and SJD are "
                    "lossless; LANTERN, LANTERN++, GSD and MuLo-SD relax acceptance to latent neighbours. The right "
                    "column is plain AR from the same seed.")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(value=DEFAULT_PROMPT if text_model else "0", elem_id="prompt",
                                    label="prompt" if text_model else "class id", max_lines=3)
                method = gr.Dropdown(METHODS, value=DEFAULT_IMAGE_METHOD, label="method", elem_id="method")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
                    num = gr.Slider(1, session.max_images, value=2, step=1, label="images", elem_id="num")
                with gr.Accordion("parameters", open=False):
                    # defaults: the sampling the zoo's prompt faithfulness is measured with
                    cfg = gr.Slider(1.0, 8.0, value=IMAGE_SAMPLING["cfg_scale"], step=0.5, label="CFG scale")
                    temperature = gr.Slider(0.0, 1.5, value=IMAGE_SAMPLING["temperature"], step=0.1,
                                            label="temperature (0 = greedy)")
                    top_k = gr.Slider(0, 256, value=IMAGE_SAMPLING["top_k"], step=1, label="top-k (0 = off)")
                    k = gr.Slider(1, 16, value=8, step=1, label="draft length / SJD window")
                    delta = gr.Slider(0.0, 0.5, value=0.2, step=0.05, label="LANTERN δ")
                    lam = gr.Slider(1.0, 8.0, value=2.0, step=0.5, label="LANTERN++ λ")
                    tau = gr.Slider(0.0, 0.5, value=MULO_DEFAULT["mulo_delta"], step=0.05,
                                    label="MuLo-SD δ (total-variation budget per token; 0: the target's images)")
                    drafter = gr.Radio(list(DRAFTERS), value=DRAFTERS[0], label="drafter (exact SD, LANTERN)",
                                       elem_id="drafter")
                go = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                with gr.Row():
                    images = gr.Gallery(label="method", columns=2, height=230, elem_id="images", format="png")
                    ar_images = gr.Gallery(label="plain AR, same seed", columns=2, height=230, elem_id="ar_images",
                                           format="png")
                with gr.Row():
                    heat = gr.Image(label="acceptance heat-map", elem_id="heatmap", interactive=False, height=200,
                                    format="png")
                    stats = gr.Markdown(elem_id="stats")
        go.click(lambda *a: make_images(session, *a), [prompt, method, seed, num, cfg, temperature, top_k, k, delta,
                                                       lam, tau, drafter],
                 [images, ar_images, heat, stats], api_name="generate")
    return demo


def main(argv: list[str] | None = None) -> int:
    p = launch_parser(__doc__.split("\n")[0])
    p.set_defaults(port=7861)
    p.add_argument("--model", help="AR image model directory (default: the zoo target)")
    p.add_argument("--tokenizer", help="VQ tokenizer directory")
    p.add_argument("--drafter", help="smaller AR model or an EAGLE head folder (exact, LANTERN)")
    p.add_argument("--lowres", help="low-resolution AR model (MuLo-SD)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    launch(build_demo(load_session(a.model, a.tokenizer, a.drafter, a.lowres)), a.host, a.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Shared pieces of the Gradio demos: input limits with visible messages, launch flags, token overlays.

Glossary:
    limit error    a ``gr.Error`` raised before any model runs: Gradio shows its message in the page
                   (no stack trace) and the request ends
    overlay        the model's view of the image (processor output, de-normalised) with the visual
                   tokens the drafter did not keep darkened
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError


@dataclass(frozen=True)
class InputLimits:
    max_upload_mb: float = 8.0
    max_pixels: int = 4096 * 4096
    max_prompt_chars: int = 300


LIMITS = InputLimits()


def limit_error(message: str):
    import gradio as gr

    return gr.Error(message, print_exception=False)


def load_image(path: str | None, limits: InputLimits = LIMITS) -> Image.Image:
    """An uploaded file -> RGB PIL image, or a visible error naming what is wrong."""
    if not path:
        raise limit_error("Please upload an image or pick an example.")
    if not os.path.isfile(path):
        raise limit_error("The uploaded file could not be found; please upload it again.")
    size_mb = os.path.getsize(path) / 2**20
    if size_mb > limits.max_upload_mb:
        raise limit_error(f"The image is {size_mb:.1f} MB; the limit is {limits.max_upload_mb:g} MB.")
    not_image = "This file is not an image I can read (PNG, JPEG, GIF, BMP, WebP, TIFF ...)."
    try:
        im = Image.open(path)  # lazy: reads the header only
        width, height = im.size
    except Image.DecompressionBombError:
        raise limit_error(f"The image has too many pixels; the limit is {limits.max_pixels:,} pixels.") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise limit_error(not_image) from None
    if width * height > limits.max_pixels:
        raise limit_error(f"The image is {width}x{height} pixels; the limit is {limits.max_pixels:,} pixels.")
    try:
        im.load()
        return im.convert("RGB")
    except (OSError, ValueError):
        raise limit_error(not_image) from None


def checked_image(**kwargs):
    """A ``gr.Image`` input whose upload is checked by :func:`load_image` first, so a file that is too big
    or not an image gets that message instead of Gradio's component-processing error."""
    import gradio as gr

    component = gr.Image(**kwargs)
    preprocess = component.preprocess

    def checked_preprocess(payload):  # an instance attribute: a gr.Image subclass would make Gradio write a .pyi
        path = getattr(payload, "path", None)
        if path:
            load_image(path)
        return preprocess(payload)

    component.preprocess = checked_preprocess
    return component


def check_prompt(text: str | None, limits: InputLimits = LIMITS, what: str = "prompt") -> str:
    text = (text or "").strip()
    if not text:
        raise limit_error(f"The {what} is empty.")
    if len(text) > limits.max_prompt_chars:
        raise limit_error(f"The {what} has {len(text)} characters; the limit is {limits.max_prompt_chars}.")
    return text


def launch_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def launch(demo, host: str, port: int, *, block: bool = True):
    demo.queue(default_concurrency_limit=1, max_size=32)  # one request at a time; others wait in line
    return demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block,
                       max_file_size=f"{int(LIMITS.max_upload_mb)}mb", show_error=True, quiet=True)


def processed_image(pixel_values: torch.Tensor, image_processor) -> Image.Image | None:
    """The model's view of the first image: [B, 3, H, W] normalised pixels -> PIL (None if not that layout)."""
    if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        return None
    mean = torch.tensor(getattr(image_processor, "image_mean", [0.5, 0.5, 0.5])).view(3, 1, 1)
    std = torch.tensor(getattr(image_processor, "image_std", [0.5, 0.5, 0.5])).view(3, 1, 1)
    x = (pixel_values[0].float() * std + mean).clamp(0, 1)
    return Image.fromarray((x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy(), "RGB")


def kept_overlay(image: Image.Image, kept: list[int], num_tokens: int, scale: int = 4) -> Image.Image:
    """Darken the grid cells of the visual tokens not in ``kept`` (a square token grid over the image)."""
    side = math.isqrt(num_tokens)
    big = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    if side * side != num_tokens:
        return big
    mask = torch.full((side, side), 0.25)
    for i in kept:
        mask[i // side, i % side] = 1.0
    m = torch.nn.functional.interpolate(mask[None, None], size=(big.height, big.width), mode="nearest")[0, 0]
    arr = torch.tensor(__import__("numpy").array(big), dtype=torch.float32) * m.unsqueeze(-1)
    return Image.fromarray(arr.round().clamp(0, 255).to(torch.uint8).numpy(), "RGB")

"""Image generation for ``mmspec serve`` (``POST /v1/images/generations``): the zoo's AR image models, by any of
the image methods, PNGs returned as base64, with the chosen method's recorded quality verdict beside them.

Glossary:
    service     :class:`ImageService`: the image models, one generation at a time (a lock), at most
                ``max_waiting`` requests waiting for it (a 429 beyond)
    seed        image i of a request with seed s has seed s + i: it depends only on its prompt, method and seed
                (the loop's per-row randomness), whatever ``n`` is; without a seed one is drawn and returned
    verdict     :func:`mmspec.zoo.evaluate.distribution_verdict`: whether the method, at the front ends'
                settings, was measured to keep plain AR's attribute distributions (lossless methods by
                construction); returned in ``mmspec.distribution`` so a client sees what it trades
"""

from __future__ import annotations

import base64
import io
import random
import threading
import time
from typing import Any

from .protocol import ImageRequest, RequestError

#: the image methods the server offers: plain AR and the front ends' methods
IMAGE_METHODS = ("ar", "exact", "sjd", "gsd", "lantern", "lantern++", "mulo")


class ImageService:
    """The zoo's image models behind the images endpoint (see the module glossary)."""

    def __init__(self, models: Any, *, name: str = "mmspec-scenes", max_n: int = 4, max_waiting: int = 4):
        from mmspec.zoo.evaluate import DEFAULT_IMAGE_METHOD

        self.models, self.name, self.max_n, self.max_waiting = models, name, max_n, max_waiting
        side = int(models.tokenizer.image_size)
        self.size = f"{side}x{side}"
        self.default_method = DEFAULT_IMAGE_METHOD
        self.methods = IMAGE_METHODS
        self._lock = threading.Lock()
        self._waiting = 0
        self._count = threading.Lock()
        self.stats = {"image_requests": 0, "images": 0, "image_seconds": 0.0, "image_failed": 0}

    def check(self, req: ImageRequest) -> None:
        """A prompt the model cannot take (an unknown word, too long) is a 400 before any work."""
        from mmspec.errors import MMSpecError

        try:
            self.models.target.prefix_ids(req.prompt)
        except MMSpecError as exc:
            raise RequestError(f"'prompt': {exc}", param="prompt") from None

    def admit(self) -> None:
        """Count a request in, or a 429 when ``max_waiting`` are already waiting or running."""
        with self._count:
            if self._waiting >= self.max_waiting:
                raise RequestError("the image generator is at capacity; retry shortly", status=429,
                                   type="rate_limit_error", code="queue_full")
            self._waiting += 1

    def generate(self, req: ImageRequest) -> dict:
        """Generate ``req`` (blocking; call :meth:`admit` first): OpenAI's images response plus ``mmspec``."""
        import torch

        from mmspec.image_gen import generate
        from mmspec.zoo.evaluate import IMAGE_SAMPLING, distribution_verdict, image_method_args

        try:
            with self._lock:
                seed = req.seed if req.seed is not None else random.getrandbits(62)
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = generate(self.models.target, self.models.tokenizer, condition=[req.prompt] * req.n,
                                   seed=[seed + i for i in range(req.n)], method=req.method,
                                   **IMAGE_SAMPLING, **image_method_args(self.models, req.method))
                seconds = time.perf_counter() - t0
        except Exception:
            self.stats["image_failed"] += 1
            raise
        finally:
            with self._count:
                self._waiting -= 1
        self.stats["image_requests"] += 1
        self.stats["images"] += req.n
        self.stats["image_seconds"] += seconds
        data = []
        for img in out.images:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            data.append({"b64_json": base64.b64encode(buf.getvalue()).decode("ascii"), "revised_prompt": None})
        return {"created": int(time.time()), "data": data,
                "mmspec": {"model": self.name, "method": req.method, "seed": seed, "size": self.size,
                           "seconds": round(seconds, 3),
                           "target_forwards_per_image": round(float(out.stats.target_forwards_per_image), 2),
                           "distribution": distribution_verdict(req.method)}}


__all__ = ["IMAGE_METHODS", "ImageService"]

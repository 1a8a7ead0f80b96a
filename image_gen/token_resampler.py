"""Token-space resolution changes for MuLo-SD: low-res token grids <-> high-res token grids.

Paper: Peruzzo, Sautière, Habibian, "Multi-Scale Local Speculative Decoding for Image Generation"
(CVPR 2026): its v1 up-sampler is a learned latent network (masked convolution, pixel shuffle by r,
quantisation); v2 defaults to decode -> super-resolve -> re-encode.  Our reading and the measured
choice between the two are in ``docs/design/mulo_sd.md``.

Glossary:
    scale r          high-res grid side / low-res grid side
    up-sampler U_r   long [B, h, w] low-res tokens -> long [B, r*h, r*w] high-res tokens (MuLo-SD's
                     candidates); row-causal: high-res rows r*i .. r*i + r - 1 depend on low-res rows <= i
                     only, so a grid can be up-sampled row by row as it is drafted
    down-sampler D_r long [B, H, W] high-res tokens -> long [B, H/r, W/r] low-res tokens (the drafter's
                     prefix, re-derived from the committed high-res rows); low-res row i depends on
                     high-res rows < r*(i + 1) only
    pixel path       :class:`PixelResampler`: decode -> bicubic resize -> re-encode with the tokenizer
                     (training-free; one image at a time, so a grid's result never depends on its batch)
    learned path     :class:`TokenResampler`: two small convolutional nets over code embeddings, trained
                     by cross-entropy on (tokens at 64 px, tokens of the same image at 64/r px) pairs
                     (``python -m mmspec.zoo.train_image --stages resampler``); no pixels are touched

Both satisfy :class:`Resampler` and plug into :class:`~mmspec.image_gen.multiscale.MultiScaleDrafter`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from mmspec.errors import MMSpecError

CONFIG_NAME = "mmspec_token_resampler.json"
WEIGHTS_NAME = "model.safetensors"


@runtime_checkable
class Resampler(Protocol):
    scale: int

    def upsample(self, low: torch.Tensor) -> torch.Tensor: ...  # long [B, h, w] -> long [B, r*h, r*w]

    def downsample(self, high: torch.Tensor) -> torch.Tensor: ...  # long [B, H, W] -> long [B, H/r, W/r]


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """float [B, 3, h, w] in [-1, 1] -> [B, 3, size, size] (bicubic, antialiased when shrinking)."""
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


class PixelResampler:
    """decode -> bicubic resize -> re-encode (one nearest-code / FSQ pass), one image at a time."""

    def __init__(self, tokenizer, scale: int):
        if scale < 2 or tokenizer.image_size % scale:
            raise MMSpecError(f"scale {scale} must be >= 2 and divide the image size {tokenizer.image_size}")
        self.scale = scale
        self.hi_tok = tokenizer.resized(tokenizer.image_size)
        self.lo_tok = tokenizer.resized(tokenizer.image_size // scale)

    @torch.no_grad()
    def upsample(self, low: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.hi_tok.encode(resize_images(self.lo_tok.decode_tensor(g.unsqueeze(0)),
                                                           self.hi_tok.image_size)) for g in low])

    @torch.no_grad()
    def downsample(self, high: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.lo_tok.encode(resize_images(self.hi_tok.decode_tensor(g.unsqueeze(0)),
                                                           self.lo_tok.image_size)) for g in high])


@dataclass(frozen=True)
class TokenResamplerConfig:
    vocab_size: int
    scale: int = 2
    width: int = 96
    depth: int = 3  # 3x3 convolutions per direction


class _RowCausalConv(torch.nn.Conv2d):
    """3x3 convolution whose output row i sees input rows i-1 and i (zero row above the grid)."""

    def __init__(self, width: int):
        super().__init__(width, width, kernel_size=(2, 3), padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, h, w]
        return super().forward(F.pad(x, (1, 1, 1, 0)))


class TokenResampler(torch.nn.Module):
    """Learned U_r and D_r over token embeddings (see the module glossary). Models never decode:
    ``up_logits`` / ``down_logits`` give logits; ``upsample`` / ``downsample`` take their argmax."""

    def __init__(self, config: TokenResamplerConfig):
        super().__init__()
        self.config = config
        self.scale = config.scale
        c, r, v = config.width, config.scale, config.vocab_size
        self.embed = torch.nn.Embedding(v, c)
        self.up_body = torch.nn.ModuleList(_RowCausalConv(c) for _ in range(config.depth))
        self.up_head = torch.nn.Conv2d(c, r * r * c, 1)  # pixel shuffle by r
        self.up_out = torch.nn.Conv2d(c, v, 1)
        # down: pixel-unshuffle by r (each low-res cell sees exactly its r x r high-res block) + 1x(3) convs
        self.down_in = torch.nn.Conv2d(r * r * c, c, 1)
        self.down_body = torch.nn.ModuleList(_RowCausalConv(c) for _ in range(config.depth))
        self.down_out = torch.nn.Conv2d(c, v, 1)

    def _check(self, tokens: torch.Tensor, what: str) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or tokens.dtype != torch.long:
            raise MMSpecError(f"{what} must be a long tensor [B, h, w], got {tokens!r:.60}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise MMSpecError(f"{what} ids must be in [0, {self.config.vocab_size})")
        return tokens

    def _emb(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens).permute(0, 3, 1, 2)  # [B, C, h, w]

    def up_logits(self, low: torch.Tensor) -> torch.Tensor:
        """long [B, h, w] -> logits [B, V, r*h, r*w]."""
        x = self._emb(self._check(low, "low-res tokens"))
        for conv in self.up_body:
            x = x + F.gelu(conv(x))
        return self.up_out(F.gelu(F.pixel_shuffle(self.up_head(x), self.scale)))

    def down_logits(self, high: torch.Tensor) -> torch.Tensor:
        """long [B, H, W] -> logits [B, V, H/r, W/r]."""
        high = self._check(high, "high-res tokens")
        if high.shape[1] % self.scale or high.shape[2] % self.scale:
            raise MMSpecError(f"high-res grid {tuple(high.shape[1:])} is not divisible by the scale {self.scale}")
        x = self.down_in(F.pixel_unshuffle(self._emb(high), self.scale))
        for conv in self.down_body:
            x = x + F.gelu(conv(x))
        return self.down_out(F.gelu(x))

    @torch.no_grad()
    def upsample(self, low: torch.Tensor) -> torch.Tensor:
        return self.up_logits(low).argmax(1)

    @torch.no_grad()
    def downsample(self, high: torch.Tensor) -> torch.Tensor:
        return self.down_logits(high).argmax(1)

    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(path / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "TokenResampler":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"no token resampler at {str(path)!r} (missing {CONFIG_NAME})")
        model = cls(TokenResamplerConfig(**json.loads((path / CONFIG_NAME).read_text())))
        model.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
        return model.eval()


__all__ = ["PixelResampler", "Resampler", "TokenResampler", "TokenResamplerConfig", "resize_images"]

"""Image tokenizers: images <-> grids of discrete VQ tokens (the vocabulary of AR image models).

Glossary:
    VQ          vector quantisation: every latent vector of an image autoencoder is replaced by
                the nearest entry (Euclidean distance) of a learned table; the entry's index is
                the token.  VQGAN (Esser, Rombach & Ommer, "Taming Transformers for
                High-Resolution Image Synthesis", CVPR 2021) is the tokenizer family used by
                AR image models (LlamaGen, Lumina-mGPT, ...); ``diffusers.VQModel`` implements
                its encoder / quantizer / decoder.
    codebook    that table, a float tensor [V, d]: V = vocabulary size, d = code dimension.
    FSQ         finite scalar quantisation (Mentzer et al., "Finite Scalar Quantization: VQ-VAE
                Made Simple", ICLR 2024): each of the d latent channels is bounded and rounded to
                one of L_i levels, so the codebook is the fixed lattice of prod(L_i) points and
                nothing can collapse; lattice neighbours are latent neighbours.  A ``VQTokenizer``
                with ``fsq_levels`` quantises with ``vector_quantize_pytorch.FSQ``; the VQModel's
                embedding table then holds the lattice (row i = the code of index i), so decoding
                and the codebook are the same as for VQ.
    grid        the token layout of one image, [H, W] = image_size / f with f = 2**(n - 1) the
                encoder's downsampling factor (n = ``len(block_out_channels)``).  Tokens are in
                raster order: ``tokens[b, i, j]`` is latent row i, column j, and flattening a
                grid row by row gives the AR model's sequence.
    pixels      images are RGB, float in [-1, 1] as tensors [B, 3, h, w] or PIL images
                (uint8); ``decode`` returns PIL, ``decode_tensor`` the float tensor.

Pipeline (``VQTokenizer`` on a ``diffusers.VQModel``)::

    encode:  image --preprocess--> x [B,3,S,S] --encoder+quant_conv--> z [B,d,H,W]
                   --nearest code (VQModel.quantize, cdist + argmin)--> tokens [B,H,W]
    decode:  tokens --codebook lookup (quantize.get_codebook_entry)--> z_q [B,d,H,W]
                    --VQModel.decode(z_q, force_not_quantize=True)--> x [B,3,S,S] --> PIL

``decode_tensor(encode(x))`` is the VQModel's own forward pass ``VQModel(x).sample`` (up to
float rounding of its straight-through estimator).  The quantizer's ``legacy`` flag only
changes the training loss; ``lookup_from_codebook=True`` models are decoded from the indices.

Round trips.  The quantisation step is a projection: every code maps to itself
(``quantize(embed(t)) == t`` for a codebook with distinct rows), so ``embed . quantize`` is
idempotent.  The full token -> image -> token map ``encode(decode(t))`` of nearest-code encoding
is *not* idempotent in general: it is only as close to the identity as the encoder is to an inverse
of the decoder.  Untrained (random) VQ models change most tokens on every pass (measured in
tests/test_image_tokenizer.py); a trained VQGAN is closer to idempotent, but not exactly (the zoo
tokenizer keeps 97.9 % of the tokens).  ``encoding=FixedPointEncoding()`` makes it exact: ``encode``
then returns fixed points of the round trip (see :mod:`mmspec.image_gen.fixed_point`), so
``encode(decode(encode(x))) == encode(x)`` through PIL images and float tensors alike.
"""

from __future__ import annotations

import json
import os
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmspec.errors import MMSpecError, ShapeError

from .fixed_point import FixedPointEncoding, FixedPointResult, find_fixed_points, snap_to_8bit

__all__ = [
    "ImageTokenizer",
    "VQTokenizer",
    "tiny_vq_tokenizer",
    "write_fsq_codebook",
    "InvalidImageError",
    "InvalidTokenError",
    "TokenizerConfigError",
    "TOKENIZER_CONFIG_NAME",
    "pil_to_tensor",
    "tensor_to_pil",
]

TOKENIZER_CONFIG_NAME = "mmspec_tokenizer.json"
_FORMAT = "mmspec.VQTokenizer"
_FORMAT_VERSION = 1  # version 1 files without "encoding" load with nearest-code encoding
_SAVED = object()  # from_pretrained: keep the encoding the directory was saved with
# Tolerance for float pixel tensors slightly outside [-1, 1] (float rounding of a decoder).
_PIXEL_RANGE_TOL = 1e-3


class InvalidImageError(MMSpecError):
    """Something passed as an image is not a PIL image / float pixel tensor in [-1, 1]."""


class InvalidTokenError(MMSpecError):
    """Image tokens are not integers or fall outside the vocabulary [0, V)."""


class TokenizerConfigError(MMSpecError):
    """The tokenizer cannot be built or loaded with these settings (e.g. an image size the
    encoder cannot downsample to an integer grid)."""


ImageInput = Any  # PIL.Image.Image | Sequence[PIL.Image.Image] | torch.Tensor [B, 3, h, w]


@runtime_checkable
class ImageTokenizer(Protocol):
    """What AR image generation needs from a tokenizer (implemented by ``VQTokenizer``)."""

    def encode(self, images: ImageInput) -> torch.LongTensor:
        """PIL image(s) or float tensor [B, 3, h, w] in [-1, 1] -> tokens long [B, H, W]."""
        ...

    def decode(self, tokens: torch.LongTensor) -> list[Image.Image]:
        """Tokens long [B, H, W] -> B RGB PIL images of ``image_size`` x ``image_size``."""
        ...

    @property
    def codebook(self) -> torch.Tensor:
        """Code vectors, float [V, d] (detached)."""
        ...

    @property
    def grid_size(self) -> tuple[int, int]:
        """(H, W) token grid of one ``image_size`` x ``image_size`` image."""
        ...

    @property
    def image_size(self) -> int:
        """Side S of the square images the tokenizer encodes and decodes."""
        ...

    @property
    def vocab_size(self) -> int:
        """Number V of codes (tokens are in [0, V))."""
        ...


# --------------------------------------------------------------------------- pixels <-> PIL

def _pil_to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB.  Transparent pixels are composited onto white (``convert("RGB")``
    alone would expose whatever colour hides under alpha = 0)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def pil_to_tensor(images: Sequence[Image.Image], image_size: int) -> torch.Tensor:
    """PIL images of any size / mode -> float [B, 3, S, S] in [-1, 1] (bicubic resize, RGB)."""
    arrays = []
    for img in images:
        rgb = _pil_to_rgb(img)
        if rgb.size != (image_size, image_size):
            rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(rgb, dtype=np.uint8))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(torch.float32)
    return x / 127.5 - 1.0


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """Float [B, 3, h, w] in [-1, 1] (clamped) -> RGB uint8 PIL images.

    Pixel value v becomes round((v + 1) * 127.5); reading it back with ``pil_to_tensor``
    therefore moves every value by at most 1/255."""
    x = x.detach().to("cpu", torch.float32).clamp(-1.0, 1.0)
    u8 = ((x + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return [Image.fromarray(a, mode="RGB") for a in u8]


def _describe(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__qualname__


# --------------------------------------------------------------------------- VQ tokenizer

class VQTokenizer:
    """``ImageTokenizer`` on a ``diffusers.VQModel`` (VQGAN encoder / quantizer / decoder).

    Args:
        vq_model: the autoencoder; put in eval mode.  Its quantizer's embedding is the codebook.
        image_size: side S of the square images; must be a multiple of the downsampling factor
            f = 2**(len(block_out_channels) - 1).  Grid: (S / f, S / f).
        encoding: how ``encode`` picks tokens: ``None`` (default) the nearest code of every latent
            (one encoder pass, the VQModel's own quantisation); ``FixedPointEncoding()`` a fixed point
            of decode -> encode, so round trips are exact (a few encoder/decoder passes per image).
    """

    def __init__(self, vq_model: Any, image_size: int, *, encoding: FixedPointEncoding | None = None,
                 fsq_levels: Sequence[int] | None = None):
        quantize = getattr(vq_model, "quantize", None)
        if quantize is None or not hasattr(quantize, "embedding") or not hasattr(vq_model, "config"):
            raise TokenizerConfigError(
                f"vq_model must be a diffusers VQModel (encoder, quantize.embedding, decoder); "
                f"got {_describe(vq_model)}"
            )
        if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size <= 0:
            raise TokenizerConfigError(f"image_size must be a positive int, got {image_size!r}")
        factor = 2 ** (len(vq_model.config.block_out_channels) - 1)
        if image_size % factor:
            raise TokenizerConfigError(
                f"image_size {image_size} is not a multiple of the encoder's downsampling factor "
                f"{factor} (2**(len(block_out_channels) - 1)); the token grid would not be an integer"
            )
        if encoding is not None and not isinstance(encoding, FixedPointEncoding):
            raise TokenizerConfigError(
                f"encoding must be None (nearest code) or a FixedPointEncoding, got {_describe(encoding)}"
            )
        self.vq_model = vq_model.eval()
        self._image_size = int(image_size)
        self._factor = factor
        self.encoding = encoding
        self.fsq = None if fsq_levels is None else _fsq_quantizer(vq_model, fsq_levels)

    # ------------------------------------------------------------------ construction / io

    @classmethod
    def from_config(cls, *, image_size: int, **vq_kwargs: Any) -> "VQTokenizer":
        """A randomly initialised ``VQModel(**vq_kwargs)`` (seed torch's RNG beforehand)."""
        from diffusers import VQModel

        vq_kwargs.setdefault("sample_size", image_size)
        return cls(VQModel(**vq_kwargs), image_size)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, image_size: int | None = None,
                        encoding: Any = _SAVED, **kw: Any) -> "VQTokenizer":
        """Load a directory written by ``save_pretrained`` (or a plain diffusers VQModel
        directory; then image_size defaults to the model's ``sample_size``).  ``encoding`` defaults
        to the saved one (nearest code for plain VQModel directories).  ``kw`` goes to
        ``VQModel.from_pretrained`` (``torch_dtype``, ``subfolder``, ...)."""
        from diffusers import VQModel

        path = os.fspath(path)
        meta_file = os.path.join(path, TOKENIZER_CONFIG_NAME)
        meta: dict[str, Any] = {}
        if os.path.isfile(meta_file):
            with open(meta_file, encoding="utf-8") as f:
                meta = json.load(f)
            if meta.get("format") != _FORMAT:
                raise TokenizerConfigError(
                    f"{meta_file} is not an mmspec VQTokenizer config (format={meta.get('format')!r})"
                )
        vq = VQModel.from_pretrained(path, **kw)
        if image_size is None:
            image_size = meta.get("image_size", vq.config.sample_size)
        if encoding is _SAVED:
            try:
                encoding = FixedPointEncoding.from_json(meta.get("encoding"))
            except MMSpecError as e:
                raise TokenizerConfigError(f"{meta_file}: {e}") from None
        return cls(vq, image_size, encoding=encoding, fsq_levels=meta.get("fsq_levels"))

    def resized(self, image_size: int, *, encoding: FixedPointEncoding | None = None) -> "VQTokenizer":
        """The same autoencoder and quantizer at another image size (grid image_size / f), with
        ``encoding`` (default: one nearest-code / FSQ pass)."""
        levels = None if self.fsq is None else [int(v) for v in self.fsq._levels.tolist()]
        return VQTokenizer(self.vq_model, image_size, encoding=encoding, fsq_levels=levels)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the VQModel (config.json + safetensors) and ``mmspec_tokenizer.json``."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        self.vq_model.save_pretrained(path, safe_serialization=True)
        meta = {"format": _FORMAT, "version": _FORMAT_VERSION, "image_size": self._image_size,
                "encoding": None if self.encoding is None else self.encoding.to_json()}
        if self.fsq is not None:
            meta["fsq_levels"] = [int(v) for v in self.fsq._levels.tolist()]
        with open(os.path.join(path, TOKENIZER_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")

    # ------------------------------------------------------------------ properties

    @property
    def codebook(self) -> torch.Tensor:
        return self.vq_model.quantize.embedding.weight.detach()

    @property
    def vocab_size(self) -> int:
        return int(self.vq_model.quantize.embedding.num_embeddings)

    @property
    def code_dim(self) -> int:
        return int(self.vq_model.quantize.embedding.embedding_dim)

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def downsample_factor(self) -> int:
        return self._factor

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self._image_size // self._factor
        return (side, side)

    @property
    def device(self) -> torch.device:
        return self.codebook.device

    @property
    def dtype(self) -> torch.dtype:
        return self.codebook.dtype

    def __repr__(self) -> str:
        return (f"VQTokenizer(image_size={self.image_size}, grid_size={self.grid_size}, "
                f"vocab_size={self.vocab_size}, code_dim={self.code_dim}, encoding={self.encoding})")

    # ------------------------------------------------------------------ validation

    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """Images -> float [B, 3, S, S] in [-1, 1] on the model's device and dtype.

        PIL images (any size, any mode: grayscale, RGBA, palette, ...) are converted to RGB and
        resized with PIL's bicubic filter; float tensors [B, 3, h, w] of another size are
        resized with torch's antialiased bicubic interpolation and clamped to [-1, 1]."""
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, (list, tuple)):
            if len(images) == 0:
                raise InvalidImageError("no images: got an empty list")
            for i, img in enumerate(images):
                if not isinstance(img, Image.Image):
                    raise InvalidImageError(
                        f"images[{i}] is a {_describe(img)}, not a PIL.Image.Image; pass PIL images "
                        f"or one float tensor [B, 3, h, w]"
                    )
            x = pil_to_tensor(images, self._image_size)
        elif isinstance(images, torch.Tensor):
            x = self._check_pixels(images)
        else:
            raise InvalidImageError(
                f"cannot encode a {_describe(images)}: expected a PIL.Image.Image, a list of PIL "
                f"images, or a float tensor [B, 3, h, w] with values in [-1, 1]"
            )
        return x.to(self.device, self.dtype)

    def _check_pixels(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_floating_point(x):
            raise InvalidImageError(
                f"pixel tensor must be floating point with values in [-1, 1], got dtype {x.dtype} "
                f"(convert uint8 images with x / 127.5 - 1)"
            )
        if x.dim() != 4:
            raise ShapeError(f"pixel tensor must be [B, 3, h, w], got shape {tuple(x.shape)}")
        if x.shape[1] != 3:
            raise ShapeError(
                f"pixel tensor must have 3 (RGB) channels in dim 1, got {x.shape[1]} channels "
                f"(shape {tuple(x.shape)}; expected [B, 3, h, w])"
            )
        if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ShapeError(f"pixel tensor is empty: shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise InvalidImageError("pixel tensor contains NaN or inf")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1.0 - _PIXEL_RANGE_TOL or hi > 1.0 + _PIXEL_RANGE_TOL:
            raise InvalidImageError(
                f"pixel values must lie in [-1, 1], got range [{lo:.4g}, {hi:.4g}] "
                f"(images in [0, 1] need x * 2 - 1, in [0, 255] need x / 127.5 - 1)"
            )
        if tuple(x.shape[2:]) != (self._image_size, self._image_size):
            x = F.interpolate(x.float(), size=(self._image_size, self._image_size), mode="bicubic",
                              align_corners=False, antialias=True)
        return x.clamp(-1.0, 1.0)

    def check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Validate tokens [B, H, W] (integer, in [0, V), H, W = grid_size) -> long tensor on
        the model's device."""
        if not isinstance(tokens, torch.Tensor):
            raise InvalidTokenError(
                f"tokens must be a torch.LongTensor [B, H, W], got a {_describe(tokens)}"
            )
        if tokens.dtype == torch.bool or torch.is_floating_point(tokens) or torch.is_complex(tokens):
            raise InvalidTokenError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
        H, W = self.grid_size
        if tokens.dim() != 3:
            raise ShapeError(
                f"tokens must be [B, H, W] = [B, {H}, {W}], got shape {tuple(tokens.shape)}"
            )
        if tuple(tokens.shape[1:]) != (H, W):
            raise ShapeError(
                f"token grid must be {H}x{W} for image_size {self.image_size}, got shape "
                f"{tuple(tokens.shape)}"
            )
        if tokens.shape[0] == 0:
            raise ShapeError("tokens have an empty batch (B = 0)")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = int(((tokens < 0) | (tokens >= self.vocab_size)).sum())
            raise InvalidTokenError(
                f"token ids out of range [0, {self.vocab_size}): {bad} token(s), min {lo}, max {hi}"
            )
        return tokens.to(self.device, torch.long)

    # ------------------------------------------------------------------ encode

    @torch.no_grad()
    def encode_latents(self, images: ImageInput) -> torch.Tensor:
        """Images -> pre-quantisation latents z = quant_conv(encoder(x)), float [B, d, H, W]."""
        x = self.preprocess(images)
        return self.vq_model.encode(x).latents

    @torch.no_grad()
    def quantize(self, latents: torch.Tensor) -> torch.LongTensor:
        """Latents [B, d, H, W] -> index of the nearest code at every position, long [B, H, W]
        (the VQModel's own quantizer: ``torch.cdist`` + ``argmin``, ties to the lower index; with FSQ,
        the lattice point of the bounded latent)."""
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or latents.shape[1] != self.code_dim:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else _describe(latents)
            raise ShapeError(f"latents must be [B, {self.code_dim}, H, W], got {shape}")
        B, _, H, W = latents.shape
        if self.fsq is not None:  # bound and round every channel: the index of the lattice point
            _, indices = self.fsq(latents.to(self.device, self.dtype))  # channel-first [B, d, H, W]
            return indices.reshape(B, H, W).to(torch.long)
        _, _, (_, _, indices) = self.vq_model.quantize(latents.to(self.device, self.dtype))
        # indices come from z.permute(0, 2, 3, 1).view(-1, d): batch, then row, then column
        return indices.reshape(B, H, W).to(torch.long)

    @torch.no_grad()
    def encode(self, images: ImageInput) -> torch.LongTensor:
        """PIL image(s) (any size / mode) or float [B, 3, h, w] in [-1, 1] -> tokens [B, H, W], by
        the tokenizer's ``encoding``: nearest codes (one encoder pass), or fixed points of
        decode -> encode (a few encoder and decoder passes per image, one image at a time; far more
        for images unlike the training data; raises ``FixedPointError`` past ``max_passes``)."""
        if self.encoding is None:
            return self.encode_nearest(images)
        return self.encode_fixed_points(images).tokens

    @torch.no_grad()
    def encode_nearest(self, images: ImageInput) -> torch.LongTensor:
        """One encoder pass: the nearest code of every latent, tokens [B, H, W]."""
        return self.quantize(self.encode_latents(images))

    @torch.no_grad()
    def round_trip(self, tokens: torch.Tensor) -> torch.LongTensor:
        """g(t) = nearest codes of the 8-bit decoding of t: what ``encode_nearest(decode(t))`` gives
        through PIL, long [B, H, W] (one image at a time with a fixed-point encoding, the g that
        ``encode`` iterates)."""
        y = snap_to_8bit(self.decode_tensor(tokens)).to(self.dtype)
        return self._nearest_one_by_one(y) if self.encoding is not None else self.encode_nearest(y)

    def _nearest_one_by_one(self, pixels: torch.Tensor) -> torch.LongTensor:
        return torch.cat([self.encode_nearest(pixels[i:i + 1]) for i in range(pixels.shape[0])])

    @torch.no_grad()
    def encode_fixed_points(self, images: ImageInput, max_passes: int | None = None) -> FixedPointResult:
        """Tokens that decode -> encode maps to themselves, with the orbit statistics (passes, tail,
        cycle length per image; on the CPU); see :mod:`mmspec.image_gen.fixed_point`.  ``max_passes``
        defaults to the tokenizer's ``FixedPointEncoding`` (256 without one).

        Every image is encoded and decoded on its own (batch size 1): convolution kernels round
        differently for different batch sizes, and exactness needs g to be a function of the grid
        alone.  Needs float32/float64 weights (in bf16/fp16 the round trip hardly ever settles)."""
        if max_passes is None:
            max_passes = (self.encoding or FixedPointEncoding()).max_passes
        else:
            max_passes = FixedPointEncoding(max_passes).max_passes
        if self.dtype not in (torch.float32, torch.float64):
            raise TokenizerConfigError(
                f"fixed-point encoding needs float32 or float64 weights, the tokenizer has {self.dtype}: load "
                f"it with torch_dtype=torch.float32, or encode with nearest codes (encoding=None)"
            )
        x = snap_to_8bit(self.preprocess(images)).to(self.device, self.dtype)  # [B, 3, S, S]

        def step(grids: torch.Tensor, rows: torch.Tensor):
            y = snap_to_8bit(self._decode_one_by_one(grids)).to(self.dtype)  # [n, 3, S, S], clamped
            cost = (y.double() - x[rows.to(x.device)].double()).pow(2).flatten(1).sum(1)
            return self._nearest_one_by_one(y), cost.cpu()

        return find_fixed_points(self._nearest_one_by_one(x), step, max_passes)

    # ------------------------------------------------------------------ decode

    @torch.no_grad()
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [B, H, W] -> their code vectors z_q, float [B, d, H, W]."""
        tokens = self.check_tokens(tokens)
        B, H, W = tokens.shape
        return self.vq_model.quantize.get_codebook_entry(tokens.reshape(-1), (B, H, W, self.code_dim))

    @torch.no_grad()
    def decode_tensor(self, tokens: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Tokens [B, H, W] -> float pixels [B, 3, S, S] (clamped to [-1, 1] unless clamp=False).
        With a fixed-point encoding, images are decoded one at a time, so that a grid decodes to
        the same pixels whatever batch it comes in (what exact round trips need)."""
        tokens = self.check_tokens(tokens)
        x = self._decode_one_by_one(tokens) if self.encoding is not None else self._decode(tokens)
        return x.clamp(-1.0, 1.0) if clamp else x

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        B, H, W = tokens.shape
        if self.vq_model.config.lookup_from_codebook:
            out = self.vq_model.decode(tokens.reshape(-1), force_not_quantize=True,
                                       shape=(B, H, W, self.code_dim))
        else:
            out = self.vq_model.decode(self.embed(tokens), force_not_quantize=True)
        return out.sample

    def _decode_one_by_one(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._decode(tokens[i:i + 1]) for i in range(tokens.shape[0])])

    def decode(self, tokens: torch.Tensor) -> list[Image.Image]:
        """Tokens [B, H, W] -> B RGB PIL images of image_size x image_size (uint8)."""
        return tensor_to_pil(self.decode_tensor(tokens))


def _fsq_quantizer(vq_model: Any, levels: Sequence[int]) -> Any:
    """``vector_quantize_pytorch.FSQ(levels)`` for ``vq_model``, whose embedding table must be its lattice."""
    from vector_quantize_pytorch import FSQ

    levels = [int(v) for v in levels]
    if len(levels) == 0 or any(v < 2 for v in levels):
        raise TokenizerConfigError(f"fsq_levels must be ints >= 2, got {levels}")
    fsq = FSQ(levels=levels).to(vq_model.quantize.embedding.weight.device)
    table = vq_model.quantize.embedding.weight
    lattice = fsq.implicit_codebook.to(table.dtype)
    if tuple(table.shape) != tuple(lattice.shape):
        raise TokenizerConfigError(f"an FSQ tokenizer with levels {levels} needs a VQModel with "
                                   f"num_vq_embeddings={lattice.shape[0]} and vq_embed_dim={lattice.shape[1]}, "
                                   f"got an embedding table {tuple(table.shape)}")
    return fsq


def write_fsq_codebook(vq_model: Any, levels: Sequence[int]) -> None:
    """Set ``vq_model``'s embedding table to the FSQ lattice of ``levels`` (row i = code of index i)."""
    from vector_quantize_pytorch import FSQ

    lattice = FSQ(levels=[int(v) for v in levels]).implicit_codebook
    with torch.no_grad():
        vq_model.quantize.embedding.weight.copy_(lattice.to(vq_model.quantize.embedding.weight))


def tiny_vq_tokenizer(
    image_size: int = 32,
    num_vq_embeddings: int = 64,
    seed: int = 0,
    *,
    block_out_channels: Sequence[int] = (16, 32, 32),
    latent_channels: int = 4,
    vq_embed_dim: int | None = None,
    norm_num_groups: int = 8,
    layers_per_block: int = 1,
    **vq_kwargs: Any,
) -> VQTokenizer:
    """A small random VQ tokenizer built offline (tests, demos before training).

    Defaults: 3 encoder blocks (factor 4), so 32x32 images <-> 8x8 grids of 64 codes of
    dimension 4; about 0.24 M parameters.  Deterministic in ``seed``; torch's global RNG is
    left untouched."""
    n = len(block_out_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VQTokenizer.from_config(
            image_size=image_size,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            latent_channels=latent_channels,
            num_vq_embeddings=num_vq_embeddings,
            vq_embed_dim=vq_embed_dim,
            norm_num_groups=norm_num_groups,
            **vq_kwargs,
        )

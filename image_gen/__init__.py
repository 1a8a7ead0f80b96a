"""AR image generation with speculative decoding (``mmspec.image_gen``).

Models: :class:`ARImageModel` (Llama-style decoder over raster VQ tokens, class or text prefix,
classifier-free guidance). Methods: plain AR, exact speculative decoding with a smaller AR
drafter, Speculative Jacobi Decoding. Relaxed rules (LANTERN, MuLo-SD) plug in as ``rule=``.
"""

from .ar_drafter import ARDrafter
from .drafting import GuidanceSpec, ImageDrafter, ImageStepOutcome
from .engine import ImageGenerationStats
from .fixed_point import FixedPointEncoding, FixedPointError, FixedPointResult
from .generate import METHODS, ImageGenerationOutput, MethodError, generate
from .model import ARImageConfig, ARImageModel, ConditionError, guidance_scale, guide
from .sjd import JacobiDrafter
from .tokenizer import ImageTokenizer, InvalidImageError, InvalidTokenError, VQTokenizer, tiny_vq_tokenizer

__all__ = [
    "ARDrafter", "ARImageConfig", "ARImageModel", "ConditionError", "FixedPointEncoding", "FixedPointError",
    "FixedPointResult", "GuidanceSpec", "ImageDrafter",
    "ImageGenerationOutput", "ImageGenerationStats", "ImageStepOutcome", "ImageTokenizer", "InvalidImageError",
    "InvalidTokenError", "JacobiDrafter", "METHODS", "MethodError", "VQTokenizer", "generate", "guidance_scale",
    "guide", "tiny_vq_tokenizer",
]

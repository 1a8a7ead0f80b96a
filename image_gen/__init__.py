"""AR image generation with speculative decoding (``mmspec.image_gen``).

Models: :class:`ARImageModel` (Llama-style decoder over raster VQ tokens, class or text prefix,
classifier-free guidance). Methods (registry :data:`METHODS`): plain AR, exact speculative decoding
with a smaller AR drafter, Speculative Jacobi Decoding, LANTERN / LANTERN++ and MuLo-SD, all on the
one decoding loop of :mod:`mmspec.engine` (MuLo-SD: its reference loop for now).
"""

from .ar_drafter import ARDrafter
from .feature_head import forced_batch, image_head, load_image_drafter
from .fixed_point import FixedPointEncoding, FixedPointError, FixedPointResult
from .generate import ImageGenerationOutput, generate, generate_stream
from .methods import METHOD_NAMES, METHODS, ImageMethod, MethodError, get_method
from .stats import ImageGenerationStats
from .model import ARImageConfig, ARImageModel, ConditionError, guidance_scale, guide
from .sjd import JacobiDrafter
from .tokenizer import ImageTokenizer, InvalidImageError, InvalidTokenError, VQTokenizer, tiny_vq_tokenizer

__all__ = [
    "ARDrafter", "ARImageConfig", "ARImageModel", "ConditionError", "FixedPointEncoding", "FixedPointError",
    "FixedPointResult", "ImageGenerationOutput", "ImageGenerationStats", "ImageMethod", "ImageTokenizer",
    "InvalidImageError", "InvalidTokenError", "JacobiDrafter", "METHOD_NAMES", "METHODS", "MethodError",
    "VQTokenizer", "forced_batch", "generate", "generate_stream", "get_method", "guidance_scale",
    "guide", "image_head", "load_image_drafter", "tiny_vq_tokenizer",
]

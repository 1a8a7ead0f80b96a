"""``mmspec serve``: an OpenAI-compatible HTTP front end: :mod:`mmspec.serve.protocol` turns request bodies into
validated requests (or OpenAI's error JSON with a 4xx) before any model work, :mod:`mmspec.serve.worker` decodes
them in continuously joined batches on the one loop (:class:`~mmspec.serve.worker.VLMWorker` for vision-language
models), :mod:`mmspec.serve.images` generates images, and :mod:`mmspec.serve.app` is the FastAPI app."""

from .protocol import (GenerationRequest, ImageRequest, RequestError, decode_body, error_body, parse_chat,
                       parse_completion, parse_image_generation)

__all__ = ["GenerationRequest", "ImageRequest", "RequestError", "decode_body", "error_body", "parse_chat",
           "parse_completion", "parse_image_generation"]

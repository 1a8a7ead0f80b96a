"""``mmspec serve``: an OpenAI-compatible HTTP front end (issue 30, in progress): :mod:`mmspec.serve.protocol`
turns request bodies into validated requests (or OpenAI's error JSON with a 4xx) before any model work,
:mod:`mmspec.serve.worker` decodes them in continuously joined batches on the one loop, and
:mod:`mmspec.serve.app` is the FastAPI app."""

from .protocol import GenerationRequest, RequestError, decode_body, error_body, parse_chat, parse_completion

__all__ = ["GenerationRequest", "RequestError", "decode_body", "error_body", "parse_chat", "parse_completion"]

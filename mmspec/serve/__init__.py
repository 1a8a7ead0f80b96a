"""``mmspec serve``: an OpenAI-compatible HTTP front end (issue 30, in progress). So far its request layer:
:mod:`mmspec.serve.protocol` turns request bodies into validated requests, or into OpenAI's error JSON with a
4xx, before any model work."""

from .protocol import GenerationRequest, RequestError, decode_body, error_body, parse_chat, parse_completion

__all__ = ["GenerationRequest", "RequestError", "decode_body", "error_body", "parse_chat", "parse_completion"]

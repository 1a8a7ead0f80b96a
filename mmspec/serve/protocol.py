"""The OpenAI-compatible request layer of ``mmspec serve``: request bodies in, validated requests or OpenAI's error
JSON out, before any model work.

Paper: none; the wire format is OpenAI's (``/v1/chat/completions``, ``/v1/completions``), with its error
object ``{"error": {"message", "type", "param", "code"}}``.

Glossary:
    body            the raw request bytes: at most :data:`MAX_BODY_BYTES` (413 beyond), UTF-8, a JSON object
    request         :class:`GenerationRequest`: the model, the conversation (chat) or prompt (completion), the
                    sampling fields under OpenAI's names and the images of ``image_url`` parts, each checked
    fields          ``max_tokens`` (1 ... the model's context), ``temperature`` (finite, 0 ... 2), ``top_p``
                    (0, 1], ``stop`` (a string or up to 4), ``seed`` (an integer), ``stream`` (a boolean), ``n``
                    (1 only); unknown fields are ignored, as OpenAI's server does for most
    image part      ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``: a data URI of a
                    PNG, JPEG or WebP at most :data:`MAX_IMAGE_BYTES` decoded, that PIL can open
    image request   ``POST /v1/images/generations``: ``model``, ``prompt``, ``n`` (1 ... the server's limit), ``seed``,
                    ``response_format`` (``b64_json`` only: the server stores nothing to link to), ``size`` (the
                    model's own, when given) and mmspec's ``method`` (an image method; default the front ends')
    RequestError    a 4xx with OpenAI's error type; ``status`` 400 (bad input), 404 (unknown model), 413 (too
                    large), 429 (queue full)
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

from mmspec.errors import MMSpecError

MAX_BODY_BYTES = 10 * 1024 * 1024
MAX_IMAGE_BYTES = 5 * 1024 * 1024
MAX_STOP = 4
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
ROLES = ("system", "user", "assistant")


class RequestError(MMSpecError):
    """A request the server answers with a 4xx: ``status``, OpenAI's error ``type``, the offending ``param``."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.type, self.code = message, status, param, type, code


def error_body(err: RequestError) -> dict:
    """OpenAI's error JSON for ``err``."""
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


@dataclass
class GenerationRequest:
    """A validated chat or completion request (see the module glossary)."""

    kind: str  # "chat" or "completion"
    model: str
    messages: list[dict] = field(default_factory=list)  # chat: [{"role", "content": text}], images taken out
    prompt: str = ""  # completion
    images: list = field(default_factory=list)  # PIL images of the chat's image parts, in order
    parts: list[dict] = field(default_factory=list)  # chat as HF processors take it: [{"role", "content":
    # [{"type": "image"} | {"type": "text", "text"}]}], the images where they were
    max_tokens: int | None = None  # None: the server's default
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False


def decode_body(body: bytes) -> dict:
    """The JSON object in ``body`` (bytes as received), or a :class:`RequestError`."""
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(f"request body of {len(body):,} bytes exceeds the limit of {MAX_BODY_BYTES:,}", status=413)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"request body is not valid UTF-8 (byte {e.start})") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RequestError:
        raise
    except (json.JSONDecodeError, RecursionError) as e:
        raise RequestError(f"request body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise RequestError(f"request body must be a JSON object, got {type(obj).__name__}")
    return obj


def _reject_constant(name: str) -> Any:
    raise RequestError(f"request body holds {name}, which is not JSON")


def _number(obj: dict, name: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    v = obj.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RequestError(f"'{name}' must be a number, got {json.dumps(v)[:40]}", param=name)
    if not math.isfinite(v):
        raise RequestError(f"'{name}' must be finite, got {v}", param=name)
    if (v <= lo if lo_open else v < lo) or v > hi:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise RequestError(f"'{name}' must be in {interval}, got {v}", param=name)
    return float(v)


def _common(obj: dict, models: dict[str, int], kind: str) -> dict:
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required: a string naming a served model", param="model")
    if model not in models:
        raise RequestError(f"the model '{model}' does not exist; this server serves: {', '.join(sorted(models))}",
                           status=404, param="model", code="model_not_found")
    n = obj.get("n", 1)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n != 1):
        raise RequestError(f"'n' must be 1 (this server returns one choice per request), got {json.dumps(n)[:40]}",
                           param="n")
    max_tokens = obj.get("max_completion_tokens", obj.get("max_tokens"))
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise RequestError(f"'max_tokens' must be an integer, got {json.dumps(max_tokens)[:40]}",
                               param="max_tokens")
        if not 1 <= max_tokens <= models[model]:
            raise RequestError(f"'max_tokens' must be in [1, {models[model]}] (the model's context), got "
                               f"{max_tokens}", param="max_tokens")
    stop = obj.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP:
        stops = list(stop)
    else:
        raise RequestError(f"'stop' must be a string or a list of at most {MAX_STOP} strings", param="stop")
    if any(not s for s in stops):
        raise RequestError("'stop' sequences must not be empty", param="stop")
    seed = obj.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2 ** 63 <= seed < 2 ** 63):
        raise RequestError(f"'seed' must be a 64-bit integer, got {json.dumps(seed)[:40]}", param="seed")
    stream = obj.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"'stream' must be true or false, got {json.dumps(stream)[:40]}", param="stream")
    return dict(kind=kind, model=model, max_tokens=max_tokens,
                temperature=_number(obj, "temperature", 1.0, 0.0, 2.0),
                top_p=_number(obj, "top_p", 1.0, 0.0, 1.0, lo_open=True), stop=stops, seed=seed, stream=stream)


def _image(url: Any, where: str):
    from PIL import Image, UnidentifiedImageError

    if not isinstance(url, str) or not url.startswith("data:"):
        raise RequestError(f"{where}: only data: URIs are accepted (base64 PNG, JPEG or WebP); this server fetches "
                           "nothing", param="messages")
    head, _, data = url.partition(",")
    mime = head[5:].split(";")[0].lower()
    if mime not in IMAGE_TYPES or not head.endswith(";base64"):
        raise RequestError(f"{where}: the data URI must be base64 of one of {', '.join(IMAGE_TYPES)}, got "
                           f"'{head[:40]}'", param="messages")
    if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise RequestError(f"{where}: the image exceeds {MAX_IMAGE_BYTES:,} bytes", status=413, param="messages")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}: the image data is not valid base64", param="messages") from None
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise RequestError(f"{where}: the data is not an image PIL can read", param="messages") from None
    return img.convert("RGB")


def parse_chat(body: bytes | dict, models: dict[str, int], *, images: bool = False) -> GenerationRequest:
    """A chat-completions request from ``body``; ``models``: served model name -> its context length;
    ``images``: whether the model takes ``image_url`` parts."""
    obj = decode_body(body) if isinstance(body, (bytes, bytearray)) else body
    common = _common(obj, models, "chat")
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("'messages' is required: a non-empty list of {role, content} objects", param="messages")
    out, pictures, structured = [], [], []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", param="messages")
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {json.dumps(role)[:40]}",
                               param="messages")
        content = m.get("content")
        if isinstance(content, str):
            text = content
            structured.append({"role": role, "content": [{"type": "text", "text": content}]})
        elif isinstance(content, list):
            parts, hf_parts = [], []
            for j, part in enumerate(content):
                pw = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append(part["text"])
                    hf_parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url":
                    hf_parts.append({"type": "image"})
                    if not images:
                        raise RequestError(f"{pw}: the model '{common['model']}' does not take images",
                                           param="messages")
                    url = part.get("image_url")
                    pictures.append(_image(url.get("url") if isinstance(url, dict) else url, pw))
                else:
                    raise RequestError(f"{pw} must be {{'type': 'text', 'text': ...}} or "
                                       "{'type': 'image_url', 'image_url': {'url': ...}}", param="messages")
            text = "".join(parts)
            structured.append({"role": role, "content": hf_parts})
        else:
            raise RequestError(f"{where}.content must be a string or a list of content parts", param="messages")
        out.append({"role": role, "content": text})
    if out[-1]["role"] == "assistant":
        raise RequestError("the last message must come from the user or the system, not the assistant",
                           param="messages")
    return GenerationRequest(messages=out, images=pictures, parts=structured, **common)


@dataclass
class ImageRequest:
    """A validated image-generation request (see the module glossary)."""

    model: str
    prompt: str
    n: int = 1
    method: str = "sjd"
    seed: int | None = None


MAX_PROMPT_CHARS = 4000


def parse_image_generation(body: bytes | dict, models: dict[str, str], *, methods: tuple[str, ...],
                           default_method: str, max_n: int) -> ImageRequest:
    """An image-generation request from ``body``; ``models``: served image model name -> its size ("64x64")."""
    obj = decode_body(body) if isinstance(body, (bytes, bytearray)) else body
    model = obj.get("model")
    if not models:
        raise RequestError("this server generates no images; start it with --images", status=404, param="model",
                           code="model_not_found")
    if model is None and len(models) == 1:
        model = next(iter(models))
    if not isinstance(model, str) or model not in models:
        raise RequestError(f"the image model {json.dumps(model)[:60]} does not exist; this server serves: "
                           f"{', '.join(sorted(models))}", status=404, param="model", code="model_not_found")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError("'prompt' is required: a non-empty string", param="prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(f"'prompt' has {len(prompt):,} characters; at most {MAX_PROMPT_CHARS:,}", param="prompt")
    n = obj.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_n:
        raise RequestError(f"'n' must be an integer in [1, {max_n}], got {json.dumps(n)[:40]}", param="n")
    fmt = obj.get("response_format", "b64_json")
    if fmt not in (None, "b64_json"):
        raise RequestError(f"'response_format' must be 'b64_json' (this server keeps no files to link to), got "
                           f"{json.dumps(fmt)[:40]}", param="response_format")
    size = obj.get("size")
    if size not in (None, "auto", models[model]):
        raise RequestError(f"'size' must be {models[model]} (the model's), got {json.dumps(size)[:40]}",
                           param="size")
    method = obj.get("method", default_method)
    if method not in methods:
        raise RequestError(f"'method' must be one of {', '.join(methods)}, got {json.dumps(method)[:40]}",
                           param="method")
    seed = obj.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
        raise RequestError(f"'seed' must be a non-negative 64-bit integer, got {json.dumps(seed)[:40]}",
                           param="seed")
    return ImageRequest(model=model, prompt=prompt, n=n, method=method, seed=seed)


def parse_completion(body: bytes | dict, models: dict[str, int]) -> GenerationRequest:
    """A (legacy) completions request from ``body``: one prompt string."""
    obj = decode_body(body) if isinstance(body, (bytes, bytearray)) else body
    common = _common(obj, models, "completion")
    prompt = obj.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("'prompt' is required: one non-empty string", param="prompt")
    return GenerationRequest(prompt=prompt, **common)


__all__ = ["GenerationRequest", "ImageRequest", "MAX_BODY_BYTES", "MAX_IMAGE_BYTES", "RequestError", "decode_body",
           "error_body", "parse_chat", "parse_completion", "parse_image_generation"]

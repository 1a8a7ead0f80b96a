"""mmspec.serve.protocol: OpenAI request bodies -> validated requests, or a 4xx with OpenAI's error JSON; never
another exception (table cases and a fuzz test of random bodies)."""

import base64
import io
import json
import random

import pytest

from mmspec.serve.protocol import (MAX_BODY_BYTES, RequestError, decode_body, error_body, parse_chat,
                                   parse_completion)

MODELS = {"smollm2": 2048, "scene-vlm": 512}


def chat(**kw):
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], **kw}
    return json.dumps(body).encode()


def png_uri(fmt="PNG", mime="image/png"):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, fmt)
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def test_a_full_request_is_read_under_openais_names():
    r = parse_chat(chat(max_tokens=16, temperature=0.7, top_p=0.9, stop=["\n\n"], seed=3, stream=True, n=1,
                        messages=[{"role": "system", "content": "be brief"},
                                  {"role": "user", "content": [{"type": "text", "text": "say "},
                                                               {"type": "text", "text": "hi"}]}]), MODELS)
    assert (r.kind, r.model, r.max_tokens, r.temperature, r.top_p, r.stop, r.seed, r.stream) == \
        ("chat", "smollm2", 16, 0.7, 0.9, ["\n\n"], 3, True)
    assert r.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say hi"}]
    d = parse_chat(chat(), MODELS)
    assert (d.max_tokens, d.temperature, d.top_p, d.stop, d.seed, d.stream) == (None, 1.0, 1.0, [], None, False)
    c = parse_completion(json.dumps({"model": "smollm2", "prompt": ["def f():"], "stop": "\n",
                                     "max_completion_tokens": 8}).encode(), MODELS)
    assert (c.kind, c.prompt, c.stop, c.max_tokens) == ("completion", "def f():", ["\n"], 8)


def test_image_parts_for_a_model_that_takes_images():
    body = {"model": "scene-vlm", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": png_uri()}}]}]}
    r = parse_chat(json.dumps(body).encode(), MODELS, images=True)
    assert len(r.images) == 1 and r.images[0].size == (8, 8) and r.messages[0]["content"] == "what is this?"
    jpeg = json.loads(json.dumps(body))
    jpeg["messages"][0]["content"][1]["image_url"]["url"] = png_uri("JPEG", "image/jpeg")
    assert parse_chat(json.dumps(jpeg).encode(), MODELS, images=True).images[0].mode == "RGB"


BAD = [
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe{}", 400, "not valid UTF-8"),
    (b"[1, 2]", 400, "must be a JSON object, got list"),
    (b'{"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400,
     "holds NaN, which is not JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), 400, "'model' is required"),
    (chat(model="gpt-9"), 404, "the model 'gpt-9' does not exist; this server serves: scene-vlm, smollm2"),
    (json.dumps({"model": "smollm2"}).encode(), 400, "'messages' is required"),
    (chat(messages=[]), 400, "'messages' is required"),
    (chat(messages=["hi"]), 400, r"messages\[0\] must be an object"),
    (chat(messages=[{"role": "robot", "content": "x"}]), 400, r"messages\[0\].role must be one of"),
    (chat(messages=[{"role": "user", "content": 5}]), 400, r"messages\[0\].content must be a string or a list"),
    (chat(messages=[{"role": "user", "content": [{"type": "audio"}]}]), 400, r"content\[0\] must be"),
    (chat(messages=[{"role": "assistant", "content": "x"}]), 400, "the last message must come from the user"),
    (chat(max_tokens=0), 400, r"'max_tokens' must be in \[1, 2048\]"),
    (chat(max_tokens=-3), 400, r"'max_tokens' must be in \[1, 2048\]"),
    (chat(max_tokens=4096), 400, r"'max_tokens' must be in \[1, 2048\] \(the model's context\), got 4096"),
    (chat(max_tokens="10"), 400, "'max_tokens' must be an integer"),
    (chat(max_tokens=1.5), 400, "'max_tokens' must be an integer"),
    (chat(temperature=-0.1), 400, r"'temperature' must be in \[0, 2\], got -0.1"),
    (chat(temperature="hot"), 400, "'temperature' must be a number"),
    (chat(temperature=True), 400, "'temperature' must be a number"),
    (chat(temperature=1e400), 400, "request body holds Infinity, which is not JSON"),
    (chat(top_p=0), 400, r"'top_p' must be in \(0, 1\], got 0"),
    (chat(top_p=1.2), 400, r"'top_p' must be in \(0, 1\]"),
    (chat(n=2), 400, "'n' must be 1"),
    (chat(stop=["a", "b", "c", "d", "e"]), 400, "'stop' must be a string or a list of at most 4"),
    (chat(stop=[""]), 400, "'stop' sequences must not be empty"),
    (chat(seed="7"), 400, "'seed' must be a 64-bit integer"),
    (chat(seed=2 ** 70), 400, "'seed' must be a 64-bit integer"),
    (chat(stream="yes"), 400, "'stream' must be true or false"),
]


@pytest.mark.parametrize("body, status, match", BAD)
def test_bad_chat_bodies_are_named_4xx(body, status, match):
    with pytest.raises(RequestError, match=match) as e:
        parse_chat(body, MODELS)
    assert e.value.status == status
    err = error_body(e.value)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"


def test_non_finite_numbers_in_an_already_decoded_body():
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "temperature": float("nan")}
    with pytest.raises(RequestError, match="'temperature' must be finite, got nan"):
        parse_chat(body, MODELS)
    with pytest.raises(RequestError, match="'top_p' must be finite"):
        parse_chat({**body, "temperature": 1.0, "top_p": float("inf")}, MODELS)


def test_bad_images_and_sizes():
    def with_url(url, model="scene-vlm"):
        return json.dumps({"model": model, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}]}]}).encode()

    with pytest.raises(RequestError, match="does not take images"):
        parse_chat(with_url(png_uri(), "smollm2"), MODELS, images=False)
    with pytest.raises(RequestError, match="only data: URIs are accepted"):
        parse_chat(with_url("https://example.com/cat.png"), MODELS, images=True)
    with pytest.raises(RequestError, match="must be base64 of one of image/png"):
        parse_chat(with_url("data:text/plain;base64,aGk="), MODELS, images=True)
    with pytest.raises(RequestError, match="not valid base64"):
        parse_chat(with_url("data:image/png;base64,@@@"), MODELS, images=True)
    with pytest.raises(RequestError, match="not an image PIL can read"):
        parse_chat(with_url("data:image/png;base64," + base64.b64encode(b"hello world").decode()), MODELS,
                   images=True)
    with pytest.raises(RequestError, match="exceeds the limit") as e:
        decode_body(b" " * (MAX_BODY_BYTES + 1))
    assert e.value.status == 413
    with pytest.raises(RequestError, match="'prompt' is required"):
        parse_completion(json.dumps({"model": "smollm2", "prompt": ""}).encode(), MODELS)


def _random_value(g: random.Random, depth: int = 0):
    kinds = ["int", "float", "str", "bool", "none"] + (["list", "dict"] if depth < 3 else [])
    k = g.choice(kinds)
    if k == "int":
        return g.choice([0, 1, -1, 7, 2 ** 40, -(2 ** 70), 4096])
    if k == "float":
        return g.choice([0.0, 0.5, -1.5, 1e308, 2.0000001, 1e-9])
    if k == "str":
        return g.choice(["", "smollm2", "user", "x" * 50, "\u00e9\u4e2d", "system", "image_url", "text"])
    if k == "bool":
        return g.random() < 0.5
    if k == "none":
        return None
    if k == "list":
        return [_random_value(g, depth + 1) for _ in range(g.randint(0, 3))]
    keys = ["model", "messages", "role", "content", "type", "text", "max_tokens", "temperature", "top_p", "n",
            "stop", "seed", "stream", "prompt", "image_url", "url"]
    return {g.choice(keys): _random_value(g, depth + 1) for _ in range(g.randint(0, 5))}


def test_fuzz_random_bodies_get_a_request_or_a_4xx_never_another_exception():
    g = random.Random(0)
    outcomes = {"ok": 0, "4xx": 0}
    for i in range(400):
        obj = _random_value(g)
        if isinstance(obj, dict) and g.random() < 0.6:  # often a plausible envelope around random fields
            obj = {"model": "smollm2", "messages": [{"role": "user", "content": _random_value(g)}], **obj}
        raw = json.dumps(obj).encode()
        if i % 7 == 0:  # and broken bytes
            cut = g.randint(0, len(raw))
            raw = raw[:cut] + bytes([g.randint(0, 255)]) + raw[cut:]
        for parse in (lambda b: parse_chat(b, MODELS, images=True), lambda b: parse_completion(b, MODELS)):
            try:
                parse(raw)
                outcomes["ok"] += 1
            except RequestError as e:
                assert 400 <= e.status < 500 and e.message
                outcomes["4xx"] += 1
    assert outcomes["ok"] > 0 and outcomes["4xx"] > 100

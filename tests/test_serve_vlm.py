"""``mmspec serve`` for a vision-language model (:class:`mmspec.serve.worker.VLMWorker`) on a tiny random LLaVA:
chat requests with OpenAI ``image_url`` parts decoded with a pruned drafter, greedy answers equal to HF
``generate`` of each request alone while several run together, text-only requests and unreadable images a 400."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from mmspec.serve.app import create_app
from mmspec.serve.worker import VLMWorker
from live_serve import post_concurrently
from tiny_vlms import build_vlm, tiny_llava_processor, truncated_vlm_drafter

TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
            "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}w3{% endif %}")


def data_uri(seed: int) -> str:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(seed: int, words: str, max_tokens: int) -> dict:
    return {"model": "tiny-vlm", "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(seed)}},
                                                      {"type": "text", "text": words}]}]}


@pytest.fixture(scope="module")
def served():
    from fastapi.testclient import TestClient

    target = build_vlm("llava", layers=2, dtype=torch.float32).eval()
    target.generation_config.eos_token_id = None
    processor = tiny_llava_processor()
    processor.chat_template = TEMPLATE
    worker = VLMWorker(target, processor, drafter=truncated_vlm_drafter(target, 1), model_name="tiny-vlm",
                       max_rows=4, context=512, keep_ratio=0.5)
    with TestClient(create_app(worker)) as client:
        yield client, target, processor, worker
    worker.close()


def hf_alone(target, processor, body) -> list[int]:
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                             "text": body["messages"][0]["content"][1]["text"]}]}]
    uri = body["messages"][0]["content"][0]["image_url"]["url"]
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")
    enc = processor(text=[processor.apply_chat_template(parts, add_generation_prompt=True)], images=[image],
                    return_tensors="pt")
    with torch.no_grad():
        out = target.generate(**enc, max_new_tokens=body["max_tokens"], do_sample=False, pad_token_id=0)
    return processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_image_chats_equal_hf_generate_alone_while_several_run_together(served):
    client, target, processor, worker = served
    bodies = [chat(i, "w5 w6 w7" if i % 2 else "w9", 6 + 3 * i) for i in range(4)]
    results = post_concurrently(client, "/v1/chat/completions", bodies)
    for body, r in zip(bodies, results):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == hf_alone(target, processor, body)
        assert r.json()["choices"][0]["message"]["content"]
    assert worker.stats["row_steps"] > 0 and worker.stats["completed"] == 4
    with client.stream("POST", "/v1/chat/completions", json={**bodies[1], "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]
    import json
    text = "".join(json.loads(ln[6:])["choices"][0]["delta"].get("content", "") for ln in lines)
    assert text == results[1].json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("body,match", [
    ({"model": "tiny-vlm", "messages": [{"role": "user", "content": "w5 w6"}]}, "answers about images"),
    ({"model": "tiny-vlm", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]},
     "not an image PIL can read"),
])
def test_text_only_or_unreadable_images_are_a_400(served, body, match):
    client = served[0]
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and match in r.json()["error"]["message"], r.text
    assert client.get("/health").status_code == 200

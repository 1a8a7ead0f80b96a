"""``mmspec serve`` on SmolLM2-135M-Instruct as a user starts it (a subprocess, cost-aware prompt lookup), talked
to with the official ``openai`` client: ten requests at once with mixed lengths and sampling settings; every
greedy answer equals HF ``generate`` of that request alone, a seeded sampled answer is the same under load and
alone, and a stream concatenates to the non-streamed text (extended tier: a real model)."""

import threading

import pytest
import torch

pytestmark = pytest.mark.extended

QUESTIONS = ["Name three prime numbers.", "What is the capital of France?",
             "Write a Python function that reverses a string.", "Explain recursion in one sentence.",
             "List the days of the week.", "What does HTTP stand for?", "Give me a haiku about autumn.",
             "How many legs does a spider have?"]


@pytest.fixture(scope="module")
def server():
    from live_serve import live_serve

    with live_serve("--target", "smollm2", "--max-rows", "8", "--max-tokens", "48", wait_seconds=600) as url:
        yield url


def hf_alone(model, tok, question: str, max_tokens: int) -> str:
    enc = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_smollm2_served_under_load_equals_hf_generate_alone(server):
    import openai

    from mmspec.pretrained import load_causal_lm

    client = openai.OpenAI(base_url=server, api_key="none", max_retries=0, timeout=600)
    greedy = [(q, 16 + 4 * i) for i, q in enumerate(QUESTIONS)]
    sampled = [("Tell me a short story about a robot.", 1234, 0.8, 0.9), ("Describe the sea.", 99, 1.0, 1.0)]
    out: dict = {}

    def ask(key, question, max_tokens, temperature, top_p=1.0, seed=None):
        r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": question}],
                                           max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        out[key] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(("g", i), q, n, 0.0)) for i, (q, n) in enumerate(greedy)]
    threads += [threading.Thread(target=ask, args=(("s", i), q, 32, t, p, seed))
                for i, (q, seed, t, p) in enumerate(sampled)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    model, tok = load_causal_lm()
    for i, (q, n) in enumerate(greedy):
        assert out[("g", i)] == hf_alone(model, tok, q, n), q
    for i, (q, seed, t, p) in enumerate(sampled):  # alone now, nothing else running
        ask(("alone", i), q, 32, t, p, seed)
        assert out[("alone", i)] == out[("s", i)]
    stream = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                            max_tokens=greedy[0][1], temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == out[("g", 0)]

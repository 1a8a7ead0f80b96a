"""mmspec serve on a tiny chat model: OpenAI-shaped responses, greedy text equal to HF generate of each request
alone while a batch runs, seeded sampling equal alone and in a batch, streams that concatenate to the
non-streamed text, 4xx for bad input and 429 for a full queue while the server keeps serving."""

import json
import threading

import pytest
import torch

from mmspec.serve.app import create_app
from mmspec.serve.worker import Worker
from live_serve import post_concurrently
from tiny_tokenizer import save_tiny_chat_model


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from fastapi.testclient import TestClient

    model, tok = save_tiny_chat_model(tmp_path_factory.mktemp("m"), layers=2)
    model.eval()
    worker = Worker(model, tok, model_name="tiny", max_rows=8, max_queue=32, default_max_tokens=24, context=512)
    with TestClient(create_app(worker)) as client:
        yield client, model, tok, worker
    worker.close()


def hf_alone(model, tok, messages, max_tokens):
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False,
                         eos_token_id=model.generation_config.eos_token_id,
                         pad_token_id=model.generation_config.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


PROMPTS = ["Return the JSON", "Deserialize a str instance containing a JSON document", "hi",
           "Serialize obj to a JSON formatted str", "object_hook is an optional function", "x y z",
           "If skipkeys is true then dict keys that are not basic types", "encoding"]


def test_greedy_responses_equal_hf_generate_alone_while_eight_run_together(served):
    client, model, tok, _ = served
    bodies = [{"model": "tiny", "messages": [{"role": "user", "content": p}], "max_tokens": 8 + 3 * i,
               "temperature": 0} for i, p in enumerate(PROMPTS)]
    results = post_concurrently(client, "/v1/chat/completions", bodies)
    for body, r in zip(bodies, results):
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
        text = out["choices"][0]["message"]["content"]
        assert text == hf_alone(model, tok, body["messages"], body["max_tokens"])
        assert out["usage"]["completion_tokens"] <= body["max_tokens"]
        assert out["choices"][0]["finish_reason"] in ("stop", "length")


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(served):
    client = served[0]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Serialize obj"}], "max_tokens": 16,
            "temperature": 0.9, "top_p": 0.95, "seed": 1234}
    alone = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    results = {}

    def call(i):
        b = body if i == 0 else {**body, "seed": 99 + i, "messages": [{"role": "user", "content": PROMPTS[i]}]}
        results[i] = client.post("/v1/chat/completions", json=b).json()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results[0]["choices"][0]["message"]["content"] == alone


def test_streamed_pieces_concatenate_to_the_text(served):
    client = served[0]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Return the JSON"}], "max_tokens": 20,
            "temperature": 0}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    comp = client.post("/v1/completions", json={"model": "tiny", "prompt": "Return the", "max_tokens": 10,
                                                "temperature": 0, "stop": ["\n"]}).json()
    assert comp["object"] == "text_completion" and "\n" not in comp["choices"][0]["text"]


def test_bad_requests_are_4xx_and_the_server_keeps_serving(served):
    client, _, _, worker = served
    for body, status, match in [
        (b"{oops", 400, "not valid JSON"),
        (json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}).encode(), 404,
         "does not exist"),
        (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 3}).encode(), 400,
         "'n' must be 1"),
        (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x " * 600}]}).encode(), 400,
         "exceeds the model's context of 512"),
    ]:
        r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status and match in r.json()["error"]["message"], r.text
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    metrics = client.get("/metrics").text
    assert "mmspec_requests_total" in metrics and "mmspec_step_seconds" in metrics
    ok = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                                   "max_tokens": 4})
    assert ok.status_code == 200


def test_a_full_queue_is_a_429_with_retry_after(tmp_path):
    from fastapi.testclient import TestClient

    from mmspec.serve.protocol import GenerationRequest

    model, tok = save_tiny_chat_model(tmp_path, layers=1)
    worker = Worker(model, tok, model_name="tiny", max_rows=1, max_queue=1, default_max_tokens=4, context=256)
    gate = threading.Event()
    real = worker._run_wave
    worker._run_wave = lambda wave: (gate.wait(10), real(wave))  # hold the worker on its first wave
    req = GenerationRequest(kind="chat", model="tiny", messages=[{"role": "user", "content": "x"}])
    first = worker.submit(req)  # taken by the worker, held
    import time
    for _ in range(100):
        if worker.queue.qsize() == 0:
            break
        time.sleep(0.01)
    worker.submit(req)  # fills the queue
    with TestClient(create_app(worker)) as client:
        r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "y"}]})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
    gate.set()
    assert first.result(30) is not None
    worker.close()


def test_the_official_openai_client_against_a_live_mmspec_serve(tmp_path):
    """`mmspec serve` as a user starts it (a subprocess on a HF folder), talked to with the `openai` client."""
    import openai

    from live_serve import live_serve

    model, tok = save_tiny_chat_model(tmp_path / "tiny", layers=2)
    with live_serve("--target", str(tmp_path / "tiny"), "--name", "tiny", "--max-tokens", "16") as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        messages = [{"role": "user", "content": "Deserialize a str instance"}]
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
        assert r.choices[0].message.content == hf_alone(model, tok, messages, 12)
        stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == r.choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="'top_p' must be in"):
            client.chat.completions.create(model="tiny", messages=messages, top_p=1.5)
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.chat.completions.create(model="gpt-4o", messages=messages)
        comp = client.completions.create(model="tiny", prompt="Return the", max_tokens=5, temperature=0)
        assert comp.choices[0].finish_reason in ("stop", "length") and comp.usage.completion_tokens <= 5
        # eight at once, mixed lengths and sampling settings: greedy ones equal HF alone, seeded ones equal alone
        asks = [(p, 6 + 2 * i, 0.0 if i % 3 else 0.8, None if i % 3 else 40 + i) for i, p in enumerate(PROMPTS)]
        got = {}

        def ask(i, p, n, t, seed):
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}],
                                               max_tokens=n, temperature=t, seed=seed)
            got[i] = r.choices[0].message.content

        threads = [threading.Thread(target=ask, args=(i, *a)) for i, a in enumerate(asks)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        for i, (p, n, t, seed) in enumerate(asks):
            if t == 0.0:
                assert got[i] == hf_alone(model, tok, [{"role": "user", "content": p}], n)
            else:
                under_load = got[i]
                ask(i, p, n, t, seed)
                assert got[i] == under_load


def _tiny_head(model):
    from mmspec.heads.eagle3 import Eagle3Config, Eagle3Head

    torch.manual_seed(0)
    vocab = model.config.vocab_size
    d2t = torch.arange(vocab)
    head = Eagle3Head(Eagle3Config.from_target(model, vocab), d2t=d2t).eval()
    head.init_from_target(model)
    return head.attach(model)


@pytest.mark.parametrize("kind", ["prompt_lookup", "head"])
def test_requests_join_a_running_batch_and_still_get_hf_generates_text(tmp_path, kind):
    """Continuous batching: requests submitted while a long one decodes join its batch between steps (no second
    batch is started for them) and each greedy answer equals HF generate of that request alone; with prompt
    lookup and with an EAGLE-3 head (FeatureDrafter.add_rows)."""
    from mmspec.serve.protocol import GenerationRequest

    model, tok = save_tiny_chat_model(tmp_path, layers=2)
    model.eval()
    long_msgs = [{"role": "user", "content": "Serialize obj to a JSON formatted str"}]
    assert len(tok(hf_alone(model, tok, long_msgs, 120))["input_ids"]) >= 100  # it runs long: no early EOS
    drafter = "prompt_lookup" if kind == "prompt_lookup" else _tiny_head(model)
    worker = Worker(model, tok, model_name="tiny", drafter=lambda: drafter, max_rows=8, context=512)

    def req(msgs, n):
        return GenerationRequest(kind="chat", model="tiny", messages=msgs, max_tokens=n, temperature=0.0)

    first = worker.submit(req(long_msgs, 120))
    assert first.pieces.get(timeout=30)  # it is decoding
    others = [(m, worker.submit(req(m, 10 + 4 * i))) for i, m in
              enumerate([[{"role": "user", "content": p}] for p in PROMPTS[:3]])]
    assert first.result(60) == hf_alone(model, tok, long_msgs, 120)
    for i, (m, h) in enumerate(others):
        assert h.result(60) == hf_alone(model, tok, m, 10 + 4 * i)
    assert worker.stats["joined"] == 3 and worker.stats["waves"] == 1
    worker.close()


def test_a_cancelled_request_frees_its_row_and_the_others_finish(tmp_path):
    from mmspec.serve.protocol import GenerationRequest

    model, tok = save_tiny_chat_model(tmp_path, layers=2)
    model.eval()
    worker = Worker(model, tok, model_name="tiny", max_rows=8, context=512)
    long_msgs = [{"role": "user", "content": "Serialize obj to a JSON formatted str"}]
    gone = worker.submit(GenerationRequest(kind="chat", model="tiny", messages=long_msgs, max_tokens=120,
                                           temperature=0.0))
    assert gone.pieces.get(timeout=30)
    stays = worker.submit(GenerationRequest(kind="chat", model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=20, temperature=0.0))
    gone.cancel()  # as a client that disconnects
    assert gone.done.wait(30) and gone.finish_reason == "cancelled" and gone.completion_tokens < 120
    assert stays.result(30) == hf_alone(model, tok, [{"role": "user", "content": "hi"}], 20)
    worker.close()


POISON = [96, 96, 96]  # "~~~" in the tiny tokenizer


def _poisoned(model):
    """``model`` whose forward raises for any batch holding a prompt with "~~~" (a generation that fails)."""
    real = model.forward

    def forward(input_ids=None, **kw):
        if input_ids is not None and input_ids.shape[-1] >= 3:
            windows = input_ids.unfold(-1, 3, 1)
            if (windows == torch.tensor(POISON)).all(-1).any():
                raise RuntimeError("poisoned prompt")
        return real(input_ids=input_ids, **kw)

    model.forward = forward
    return model


def test_a_request_whose_generation_raises_fails_alone_with_a_500(tmp_path):
    """One wave holds a request whose generation raises: that request gets a 500, every other request of the wave
    still gets HF generate's text, and the server keeps serving."""
    from fastapi.testclient import TestClient

    model, tok = save_tiny_chat_model(tmp_path, layers=2)
    model.eval()
    _poisoned(model)
    gate = threading.Event()

    class Held(Worker):  # every request lands in the first wave (a subclass: the thread starts in __init__)
        def _take_wave(self):
            gate.wait(600)
            return super()._take_wave()

    worker = Held(model, tok, model_name="tiny", max_rows=8, context=512)
    prompts = ["Return the JSON", "hi", "~~~", "x y z", "encoding"]
    results = {}
    with TestClient(create_app(worker)) as client:
        def call(p):
            results[p] = client.post("/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": p}], "max_tokens": 12, "temperature": 0})

        threads = [threading.Thread(target=call, args=(p,)) for p in prompts]
        [t.start() for t in threads]
        import time
        deadline = time.monotonic() + 120
        while worker.queue.qsize() < len(prompts) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.queue.qsize() == len(prompts)
        gate.set()
        [t.join() for t in threads]
        assert worker.stats["waves"] >= 1 and worker.stats["isolated"] == len(prompts)
        assert results["~~~"].status_code == 500 and "poisoned prompt" in results["~~~"].json()["error"]["message"]
        for p in prompts:
            if p != "~~~":
                assert results[p].status_code == 200, results[p].text
                text = results[p].json()["choices"][0]["message"]["content"]
                assert text == hf_alone(model, tok, [{"role": "user", "content": p}], 12)
        assert worker.stats["failed"] == 1
        ok = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                                       "max_tokens": 4})
        assert ok.status_code == 200
    worker.close()


def test_sixty_four_concurrent_streams_finish_with_nothing_lost(tmp_path):
    """64 streamed requests at once (more than the batch's 8 rows: they queue, join and wait): every stream ends
    with a finish reason and [DONE], and its text is HF generate's for that request alone."""
    from fastapi.testclient import TestClient

    model, tok = save_tiny_chat_model(tmp_path, layers=1)
    model.eval()
    worker = Worker(model, tok, model_name="tiny", max_rows=8, max_queue=64, context=512)
    bodies = [{"model": "tiny", "messages": [{"role": "user", "content": PROMPTS[i % 8] + " " + str(i // 8)}],
               "max_tokens": 4 + i % 9, "temperature": 0, "stream": True} for i in range(64)]
    got: dict[int, tuple[str, str | None, str]] = {}
    with TestClient(create_app(worker)) as client:
        def call(i):
            with client.stream("POST", "/v1/chat/completions", json=bodies[i]) as r:
                assert r.status_code == 200
                lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
            chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
            got[i] = ("".join(c["choices"][0]["delta"].get("content", "") for c in chunks),
                      chunks[-1]["choices"][0]["finish_reason"], lines[-1])

        threads = [threading.Thread(target=call, args=(i,)) for i in range(64)]
        [t.start() for t in threads]
        [t.join(300) for t in threads]
    worker.close()
    assert sorted(got) == list(range(64))
    for i, body in enumerate(bodies):
        text, reason, last = got[i]
        assert last == "data: [DONE]" and reason in ("stop", "length")
        assert text == hf_alone(model, tok, body["messages"], body["max_tokens"]), i
    assert worker.stats["completed"] == 64 and worker.stats["failed"] == 0


def test_a_client_that_disconnects_mid_stream_frees_its_row(tmp_path):
    """Over a real socket (uvicorn): a client reads the first pieces of a long stream and closes the connection;
    its row leaves the batch (finish reason "cancelled", far fewer tokens than asked) and the server keeps
    serving."""
    import socket
    import time

    import httpx
    import uvicorn

    model, tok = save_tiny_chat_model(tmp_path, layers=2)
    model.eval()
    real = model.forward

    def slow(*a, **kw):  # ~20 ms a step, so the 400-token stream outlives the client by far
        time.sleep(0.02)
        return real(*a, **kw)

    model.forward = slow
    worker = Worker(model, tok, model_name="tiny", max_rows=8, context=512)
    handles = []
    submit = worker.submit
    worker.submit = lambda req: handles.append(submit(req)) or handles[-1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(worker), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Serialize obj to a JSON formatted str"}],
                "max_tokens": 400, "temperature": 0, "stream": True, "stop": ["never-said"]}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                seen = 0
                for line in r.iter_lines():
                    seen += line.startswith("data: ")
                    if seen >= 3:
                        break  # leaving the block closes the connection mid-stream
            h = handles[0]
            assert h.done.wait(30), "the row was not freed"
            assert h.finish_reason == "cancelled" and h.completion_tokens < 200
            for _ in range(100):
                if worker.stats["running_rows"] == 0:
                    break
                time.sleep(0.05)
            assert worker.stats["running_rows"] == 0
            ok = http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 4,
                                                         "messages": [{"role": "user", "content": "x"}]})
            assert ok.status_code == 200
    finally:
        server.should_exit = True
        thread.join(30)
        worker.close()


def test_a_request_of_other_sampling_settings_is_not_starved_by_joining_requests(tmp_path):
    """First come, first served across sampling settings: while a greedy wave runs, a sampled request arrives and
    waits; greedy requests arriving after it no longer join the running wave but wait behind it, so it runs
    next; every answer is still HF's (greedy) or the seeded one it gets alone (sampled)."""
    from mmspec.serve.protocol import GenerationRequest

    model, tok = save_tiny_chat_model(tmp_path, layers=2)
    model.eval()
    worker = Worker(model, tok, model_name="tiny", max_rows=8, context=512)
    long_msgs = [{"role": "user", "content": "Serialize obj to a JSON formatted str"}]

    def req(msgs, n, temperature=0.0, seed=None):
        return GenerationRequest(kind="chat", model="tiny", messages=msgs, max_tokens=n, temperature=temperature,
                                 seed=seed)

    first = worker.submit(req(long_msgs, 120))
    assert first.pieces.get(timeout=30)  # the greedy wave is decoding
    sampled_msgs = [{"role": "user", "content": "hi"}]
    sampled = worker.submit(req(sampled_msgs, 12, temperature=0.9, seed=5))
    import time
    deadline = time.monotonic() + 30
    while not worker._deferred and time.monotonic() < deadline:  # the running wave has seen it
        time.sleep(0.005)
    later = worker.submit(req([{"role": "user", "content": PROMPTS[0]}], 10))
    assert first.result(60) == hf_alone(model, tok, long_msgs, 120)
    assert later.result(60) == hf_alone(model, tok, [{"role": "user", "content": PROMPTS[0]}], 10)
    assert worker.stats["joined"] == 0 and worker.stats["waves"] == 3  # greedy, then sampled, then greedy
    alone = worker.submit(req(sampled_msgs, 12, temperature=0.9, seed=5))
    assert sampled.result(60) == alone.result(60)
    worker.close()


def test_a_prefill_budget_spreads_a_burst_over_steps(tmp_path):
    """``prefill_budget``: a burst of requests starts with as many prompt tokens as the budget allows (at least
    one request) and the rest join the running wave at the next steps (one each here), so the first answer
    starts after one prefill, not the whole burst's; every answer is still HF generate's alone."""
    from mmspec.serve.protocol import GenerationRequest

    model, tok = save_tiny_chat_model(tmp_path, layers=2)
    model.eval()
    gate = threading.Event()

    class Held(Worker):
        def _take_wave(self):
            gate.wait(600)
            return super()._take_wave()

    worker = Held(model, tok, model_name="tiny", max_rows=8, context=512, prefill_budget=1)
    msgs = [[{"role": "user", "content": p}] for p in PROMPTS[:4]]
    handles = [worker.submit(GenerationRequest(kind="chat", model="tiny", messages=m, max_tokens=16,
                                               temperature=0.0)) for m in msgs]
    gate.set()
    for m, h in zip(msgs, handles):
        assert h.result(60) == hf_alone(model, tok, m, 16)
    assert worker.stats["waves"] == 1 and worker.stats["joined"] == 3
    worker.close()
    unlimited = Worker(model, tok, model_name="tiny", context=512, prefill_budget=None)
    assert unlimited.prefill_budget is None
    unlimited.close()

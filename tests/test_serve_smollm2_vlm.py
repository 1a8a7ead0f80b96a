"""``mmspec serve --target smollm2-vlm`` in process: the packaged scene VLM on SmolLM2 answers OpenAI chats with
``image_url`` parts, three at once, drafted by its EAGLE-3 head over a pruned share of the visual tokens; every
greedy answer equals HF ``generate`` of that request alone (extended tier: a real model)."""

import base64
import io
import threading

import pytest
import torch

pytestmark = pytest.mark.extended


def test_scene_vlm_served_equals_hf_generate_alone():
    from fastapi.testclient import TestClient

    from mmspec.serve.app import create_app
    from mmspec.serve.worker import VLMWorker
    from mmspec.zoo.data import heldout_scenes
    from mmspec.zoo.main_job import VLM_QUESTION
    from mmspec.zoo.scenes import render
    from mmspec.zoo.smollm2_llava import TILE, load_smollm2_vlm, vlm_inputs

    pack = load_smollm2_vlm()
    worker = VLMWorker(pack.target, pack.processor, drafter=pack.head, model_name="smollm2-vlm", max_rows=4)
    images = [render(s, TILE) for s in heldout_scenes()[:3]]

    def uri(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    bodies = [{"model": "smollm2-vlm", "max_tokens": 24 + 8 * i, "temperature": 0,
               "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri(im)}},
                                                         {"type": "text", "text": VLM_QUESTION}]}]}
              for i, im in enumerate(images)]
    got = [None] * len(bodies)
    with TestClient(create_app(worker)) as client:
        def call(i):
            got[i] = client.post("/v1/chat/completions", json=bodies[i])

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(bodies))]
        [t.start() for t in threads]
        [t.join() for t in threads]
    worker.close()
    for im, body, r in zip(images, bodies, got):
        assert r.status_code == 200, r.text
        enc = vlm_inputs(pack.processor, [im], VLM_QUESTION)
        with torch.no_grad():
            ref = pack.target.generate(**enc, max_new_tokens=body["max_tokens"], do_sample=False)
        want = pack.processor.tokenizer.decode(ref[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        assert r.json()["choices"][0]["message"]["content"] == want
    assert worker.stats["accepted"] > 0  # the head's drafts were accepted: speculation ran


def test_the_cli_serves_the_scene_vlm_with_its_head_or_small_vlm():
    import argparse

    from mmspec.cli.serve import _vlm_worker
    from mmspec.serve.worker import VLMWorker

    common = dict(model_name="smollm2-vlm", max_rows=2, max_queue=4, default_max_tokens=8)
    for drafter, kind in (("lookup", "Eagle3Head"), ("head", "Eagle3Head"), ("model", "LlavaForConditionalGeneration")):
        w = _vlm_worker(argparse.Namespace(target="smollm2-vlm", drafter=drafter, keep_ratio=0.25), common)
        try:
            assert isinstance(w, VLMWorker) and w.takes_images and type(w.vlm_drafter).__name__ == kind
        finally:
            w.close()

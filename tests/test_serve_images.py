"""``POST /v1/images/generations`` of ``mmspec serve`` on the zoo's image models: OpenAI's response shape with
PNGs as base64, the method's recorded distribution verdict beside them, seeded images reproducible and
independent of ``n``, bad requests a 4xx while the server keeps serving, a server without images a 404."""

import base64
import io

import pytest
from PIL import Image

from mmspec.serve.app import create_app
from mmspec.serve.images import ImageService
from mmspec.serve.worker import Worker
from tiny_tokenizer import save_tiny_chat_model


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from mmspec.zoo import load_default_image_models

    model, tok = save_tiny_chat_model(tmp_path_factory.mktemp("m"), layers=1)
    worker = Worker(model, tok, model_name="tiny", max_rows=2, default_max_tokens=4, context=256)
    service = ImageService(load_default_image_models(), max_n=3)
    with TestClient(create_app(worker, images=service)) as c:
        yield c, service
    worker.close()


def pngs(resp) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in resp["data"]]


def test_images_come_back_as_pngs_with_the_methods_verdict(client):
    c, service = client
    assert service.name in [m["id"] for m in c.get("/v1/models").json()["data"]]
    r = c.post("/v1/images/generations", json={"model": service.name, "prompt": "a red circle at the top left",
                                                "n": 2, "seed": 7})
    assert r.status_code == 200, r.text
    out = r.json()
    images = pngs(out)
    assert len(images) == 2 and all(im.format == "PNG" and f"{im.width}x{im.height}" == service.size
                                    for im in images)
    info = out["mmspec"]
    assert info["method"] == service.default_method == "sjd" and info["seed"] == 7
    assert info["distribution"].startswith("attribute distributions within plain AR's noise floor: yes")
    # image i has seed 7 + i: the second image alone (seed 8) is the same picture
    again = c.post("/v1/images/generations", json={"prompt": "a red circle at the top left", "seed": 8,
                                                   "method": "sjd"}).json()
    assert again["data"][0]["b64_json"] == out["data"][1]["b64_json"]
    ar = c.post("/v1/images/generations", json={"prompt": "a red circle at the top left", "seed": 7,
                                                "method": "ar"}).json()
    assert ar["mmspec"]["method"] == "ar" and len(pngs(ar)) == 1
    assert "mmspec_images_total 4" in c.get("/metrics").text


def test_the_openai_clients_images_call_as_the_readme_shows(client):
    import openai

    c, service = client
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=c, max_retries=0)
    img = api.images.generate(model="mmspec-scenes", prompt="a red circle at the top left", n=2,
                              extra_body={"seed": 7, "method": "sjd"})
    assert len(img.data) == 2 and Image.open(io.BytesIO(base64.b64decode(img.data[0].b64_json))).format == "PNG"
    with pytest.raises(openai.BadRequestError, match="'n' must be an integer"):
        api.images.generate(model="mmspec-scenes", prompt="a red circle", n=9)


@pytest.mark.parametrize("body,status,match", [
    ({"prompt": ""}, 400, "'prompt' is required"),
    ({"prompt": "x", "n": 0}, 400, "'n' must be an integer in \\[1, 3\\]"),
    ({"prompt": "x", "n": 4}, 400, "'n' must be an integer in \\[1, 3\\]"),
    ({"prompt": "x", "response_format": "url"}, 400, "'response_format' must be 'b64_json'"),
    ({"prompt": "x", "size": "1024x1024"}, 400, "'size' must be"),
    ({"prompt": "x", "method": "dall-e"}, 400, "'method' must be one of ar, exact, sjd"),
    ({"prompt": "x", "seed": -1}, 400, "'seed' must be a non-negative"),
    ({"prompt": "x", "model": "dall-e-3"}, 404, "does not exist"),
    ({"prompt": "a cat in space"}, 400, "'prompt': unknown word\\(s\\) \\['cat', 'in', 'space'\\]"),
])
def test_bad_image_requests_are_4xx_and_the_server_keeps_serving(client, body, status, match):
    c, _ = client
    r = c.post("/v1/images/generations", json=body)
    assert r.status_code == status
    import re
    assert re.search(match, r.json()["error"]["message"]), r.text
    assert c.get("/health").status_code == 200


def test_a_server_without_images_answers_404(tmp_path):
    from fastapi.testclient import TestClient

    model, tok = save_tiny_chat_model(tmp_path, layers=1)
    worker = Worker(model, tok, model_name="tiny", max_rows=2, default_max_tokens=4, context=256)
    with TestClient(create_app(worker)) as c:
        r = c.post("/v1/images/generations", json={"prompt": "a red circle"})
        assert r.status_code == 404 and "--images" in r.json()["error"]["message"]
    worker.close()

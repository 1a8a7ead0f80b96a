"""The HTTP app of ``mmspec serve`` (FastAPI): OpenAI's chat and completion endpoints, streamed as server-sent
events or not, over one :class:`~mmspec.serve.worker.Worker`.

Glossary:
    endpoints   ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/images/generations`` (with
                an :class:`~mmspec.serve.images.ImageService`), ``GET /v1/models``, ``GET /health``,
                ``GET /metrics`` (Prometheus text)
    errors      a bad request is a 4xx with OpenAI's error JSON (:mod:`mmspec.serve.protocol`), a full queue a
                429 with ``Retry-After``, a generation that raises a 500 for that request alone; the server keeps
                serving
    stream      ``data: {chunk}`` lines, one per piece, then a chunk with the finish reason and ``data: [DONE]``;
                the pieces concatenate to the non-streamed text
"""


import asyncio
import json
import queue
import time
import uuid

from .images import ImageService
from .protocol import RequestError, error_body, parse_chat, parse_completion, parse_image_generation
from .worker import Handle, Worker

#: how often a waiting response checks its request (seconds); a step of the loop takes tens of milliseconds
POLL_SECONDS = 0.005
#: how often a waiting response asks whether its client is still connected (seconds)
DISCONNECT_CHECK_SECONDS = 0.5


def create_app(worker: Worker, *, images: ImageService | None = None, request_timeout: float = 600.0):
    """The app over ``worker`` (chat and completions) and, given ``images``, ``POST /v1/images/generations``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    app = FastAPI(title="mmspec serve")
    models = {worker.model_name: worker.context}

    def error(err: RequestError) -> JSONResponse:
        headers = {"Retry-After": "1"} if err.status == 429 else None
        return JSONResponse(error_body(err), status_code=err.status, headers=headers)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    def list_models():
        names = [worker.model_name] + ([images.name] if images is not None else [])
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "mmspec"}
                                           for n in names]}

    @app.get("/metrics")
    def metrics():
        s = worker.stats
        tau = (s["accepted"] + s["row_steps"]) / max(s["row_steps"], 1)
        lines = [f"mmspec_requests_total {s['requests']}", f"mmspec_requests_completed_total {s['completed']}",
                 f"mmspec_requests_failed_total {s['failed']}", f"mmspec_requests_rejected_total {s['rejected']}",
                 f"mmspec_queue_depth {worker.queue.qsize()}", f"mmspec_running_rows {s['running_rows']}",
                 f"mmspec_generated_tokens_total {s['tokens']}",
                 f"mmspec_tokens_per_second {s['tokens'] / max(s['decode_seconds'], 1e-9):.3f}",
                 f"mmspec_mean_accepted_length {tau:.4f}", f"mmspec_accepted_tokens_total {s['accepted']}",
                 f"mmspec_row_steps_total {s['row_steps']}", f"mmspec_isolated_reruns_total {s['isolated']}",
                 f"mmspec_steps_total {s['steps']}",
                 f"mmspec_step_seconds {s['decode_seconds'] / max(s['steps'], 1):.5f}"]
        if images is not None:
            i = images.stats
            lines += [f"mmspec_image_requests_total {i['image_requests']}", f"mmspec_images_total {i['images']}",
                      f"mmspec_image_requests_failed_total {i['image_failed']}",
                      f"mmspec_image_seconds_total {i['image_seconds']:.3f}"]
        return PlainTextResponse("\n".join(lines) + "\n")

    async def run(request: Request, kind: str):
        try:
            body = await request.body()
            req = (parse_chat(body, models, images=worker.takes_images) if kind == "chat" else
                   parse_completion(body, models))
            handle = worker.submit(req)
        except RequestError as err:
            return error(err)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if req.stream:
            return StreamingResponse(_stream(request, handle, rid, created, kind, worker.model_name,
                                             request_timeout), media_type="text/event-stream")
        deadline = time.monotonic() + request_timeout
        last_check = time.monotonic()
        while not handle.done.is_set() and time.monotonic() < deadline:  # no thread blocked per request
            await asyncio.sleep(POLL_SECONDS)
            if time.monotonic() - last_check > DISCONNECT_CHECK_SECONDS:
                last_check = time.monotonic()
                if await request.is_disconnected():  # nobody waits for the answer: free the row
                    handle.cancel()
                    return JSONResponse({"error": {"message": "client closed the request", "type": "cancelled",
                                                   "param": None, "code": "client_closed"}}, status_code=499)
        if not handle.done.is_set():
            handle.cancel()
            return JSONResponse({"error": {"message": "the request timed out", "type": "timeout", "param": None,
                                           "code": "timeout"}}, status_code=504)
        if handle.error is not None:
            return JSONResponse({"error": {"message": f"generation failed: {handle.error}", "type": "server_error",
                                           "param": None, "code": None}}, status_code=500)
        return _response(handle, rid, created, kind, worker.model_name)

    @app.post("/v1/images/generations")
    async def images_generations(request: Request):
        try:
            body = await request.body()
            served = {images.name: images.size} if images is not None else {}
            req = parse_image_generation(body, served, methods=images.methods if images else (),
                                         default_method=images.default_method if images else "",
                                         max_n=images.max_n if images else 1)
            images.check(req)
            images.admit()
        except RequestError as err:
            return error(err)
        try:
            return await asyncio.to_thread(images.generate, req)  # one at a time (the service's lock)
        except Exception as exc:  # a failed generation fails its own request, never the server
            return JSONResponse({"error": {"message": f"image generation failed: {exc}", "type": "server_error",
                                           "param": None, "code": None}}, status_code=500)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, "completion")

    return app


def _usage(h: Handle) -> dict:
    return {"prompt_tokens": h.prompt_tokens, "completion_tokens": h.completion_tokens,
            "total_tokens": h.prompt_tokens + h.completion_tokens}


def _response(h: Handle, rid: str, created: int, kind: str, model: str) -> dict:
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": h.text}, "finish_reason": h.finish_reason}
        return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
                "usage": _usage(h)}
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": h.text, "finish_reason": h.finish_reason, "logprobs": None}],
            "usage": _usage(h)}


async def _stream(request, h: Handle, rid: str, created: int, kind: str, model: str, timeout: float):
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
        if kind == "chat":
            delta = ({"role": "assistant", "content": text or ""} if first else
                     ({"content": text} if text is not None else {}))
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model,
                                      "choices": [choice]}) + "\n\n"

    try:
        if kind == "chat":
            yield chunk("", None, first=True)
        deadline = time.monotonic() + timeout
        last_check = 0.0
        while True:
            try:
                piece = h.pieces.get_nowait()
            except queue.Empty:  # poll: no thread is blocked per stream
                now = time.monotonic()
                if now > deadline:
                    h.cancel()
                    return
                if now - last_check > DISCONNECT_CHECK_SECONDS:
                    last_check = now
                    if await request.is_disconnected():
                        h.cancel()
                        return
                await asyncio.sleep(POLL_SECONDS)
                continue
            if piece is None:
                break
            yield chunk(piece, None)
        if h.error is not None:
            yield "data: " + json.dumps({"error": {"message": f"generation failed: {h.error}",
                                                   "type": "server_error", "param": None, "code": None}}) + "\n\n"
        else:
            yield chunk(None, h.finish_reason)
        yield "data: [DONE]\n\n"
    finally:  # the client went away (the server cancels this generator) or the stream ended: free the row
        if not h.done.is_set():
            h.cancel()


__all__ = ["create_app"]

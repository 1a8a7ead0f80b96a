"""``mmspec serve`` under load: SmolLM2-135M-Instruct behind the OpenAI-compatible server, with prompt lookup and
with speculation off, against a naive server (HF ``generate``, one request at a time).

Run from the repository root::

    python -m benchmarks.serve --out benchmarks/RESULTS.md
    python -m benchmarks.serve --quick

Glossary:
    requests      ShareGPT dev-split first user turns (never trained on), streamed chat completions of up to
                  ``--max-tokens`` tokens, greedy; each concurrency level sends the same ``--requests`` requests
                  from that many clients at once (closed loop: a client sends its next request when its last ends)
    interleaving  every server is up at once; each level runs every server back to back, in an order rotated
                  from level to level and repeat to repeat (``--repeats``), and the numbers pool the repeats
    throughput    completion tokens (the answers re-tokenised) of all requests / the level's wall time
    TTFT          time from sending a request to its first text chunk; p50 / p99 over the requests
    TPOT          per request, (last chunk - first chunk) / (its tokens - 1); p50 / p99
    ITL p99       the 99th percentile of the gaps between consecutive chunks of a stream (a chunk carries every
                  token one verification step committed)
    τ             the server's mean accepted length (``/metrics``) over the level
    open loop     ``--rates``: requests arrive as a Poisson process of that many requests a second (exponential
                  gaps, seeded), each sent at its arrival whatever is still running; the level's wall time runs
                  from the first arrival to the last answer
    naive HF      what a server without batching does: HF ``generate`` of each request alone, one after the
                  other, unstreamed (its TTFT is the whole answer's time, at concurrency c after waiting for the
                  requests before it)
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import sys
import threading
import time

from ._harness import arg_parser, begin, md_table, provenance, report

SECTION = "## Serving: mmspec serve under load (issue 30)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(worker) -> tuple[str, object]:
    import uvicorn

    from mmspec.serve.app import create_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(worker), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


async def _one(client, url: str, messages: list[dict], max_tokens: int) -> dict:
    t0 = time.perf_counter()
    chunks: list[float] = []
    text = []
    body = {"model": "smollm2", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    async with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0].get("delta", {}).get("content")
            if delta:
                chunks.append(time.perf_counter())
                text.append(delta)
    return {"sent": t0, "chunks": chunks, "text": "".join(text)}


async def _level(url: str, prompts: list[list[dict]], concurrency: int, max_tokens: int) -> tuple[list[dict], float]:
    import httpx

    queue = list(prompts)
    results: list[dict] = []

    async def client_loop(client):
        while queue:
            results.append(await _one(client, url, queue.pop(0), max_tokens))

    async with httpx.AsyncClient() as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        return results, time.perf_counter() - t0


async def _open_loop(url: str, prompts: list[list[dict]], rate: float, max_tokens: int,
                     seed: int = 0) -> tuple[list[dict], float]:
    """``prompts`` sent as a Poisson process of ``rate`` requests a second (see the module glossary)."""
    import random

    import httpx

    gaps = random.Random(seed).expovariate
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=None)) as client:
        t0 = time.perf_counter()
        tasks, due = [], 0.0
        for m in prompts:
            wait = t0 + due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(_one(client, url, m, max_tokens)))
            due += gaps(rate)
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0


def _metrics(url: str) -> dict:
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        k, _, v = line.partition(" ")
        out[k] = float(v)
    return out


def main(argv: list[str] | None = None) -> int:
    from benchmarks._specbench import chat_prompts
    from benchmarks.smollm2 import chat_model
    from mmspec.serve.worker import Worker

    ap = arg_parser("serve", __doc__, section=SECTION, quick={"requests": 4, "max_tokens": 16, "levels": "1,4", "repeats": 1})
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--levels", default="1,4,16,64", help="comma-separated concurrency levels")
    ap.add_argument("--rates", default="", help="comma-separated open-loop Poisson arrival rates (requests a second)")
    ap.add_argument("--max-rows", type=int, default=16, help="the server's rows per batch")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every level")
    args = ap.parse_args(argv)
    load_before = begin(2)
    target, tok, im_end = chat_model()
    prompts = chat_prompts(args.requests, seed=30)
    levels = [int(x) for x in args.levels.split(",") if x] + [f"{float(x):g}/s" for x in args.rates.split(",") if x]
    rows = []

    def count(text: str) -> int:
        return len(tok(text)["input_ids"])

    from mmspec.serve.worker import cost_aware_lookup

    servers = {}
    for name, drafter in (("mmspec serve, prompt lookup (k 5)", lambda: "prompt_lookup"),
                          ("mmspec serve, cost-aware prompt lookup (its default)", cost_aware_lookup(target)),
                          ("mmspec serve, no speculation", lambda: None),
                          ("mmspec serve, no speculation, whole-wave prefill (no prefill budget)", None)):
        budget = {} if drafter is not None else {"prefill_budget": None}
        worker = Worker(target, tok, model_name="smollm2", drafter=drafter or (lambda: None),
                        max_rows=args.max_rows, max_queue=4 * args.requests, default_max_tokens=args.max_tokens,
                        **budget)
        url, server = _start(worker)
        asyncio.run(_level(url, prompts[:1], 1, 8))  # warm-up
        servers[name] = (url, server, worker)
    names = list(servers)
    acc = {(n, c): {"res": [], "wall": 0.0, "acc": 0.0, "steps": 0.0} for n in names for c in levels}
    for rep in range(args.repeats):  # interleaved: every level runs every server back to back, order rotated
        for li, c in enumerate(levels):
            shift = (rep + li) % len(names)
            for n in names[shift:] + names[:shift]:
                url = servers[n][0]
                before = _metrics(url)
                res, wall = asyncio.run(_level(url, prompts, c, args.max_tokens) if isinstance(c, int) else
                                        _open_loop(url, prompts, float(c[:-2]), args.max_tokens, seed=rep))
                after = _metrics(url)
                a = acc[(n, c)]
                a["res"] += res
                a["wall"] += wall
                a["acc"] += after["mmspec_accepted_tokens_total"] - before["mmspec_accepted_tokens_total"]
                a["steps"] += after["mmspec_row_steps_total"] - before["mmspec_row_steps_total"]
                print(f"[serve] repeat {rep + 1}, {n}, concurrency {c}: {wall:.1f} s", flush=True)
    for n in names:
        for c in levels:
            a = acc[(n, c)]
            res = a["res"]
            toks = [count(r["text"]) for r in res]
            ttft = [r["chunks"][0] - r["sent"] for r in res if r["chunks"]]
            tpot = [(r["chunks"][-1] - r["chunks"][0]) / (k - 1) for r, k in zip(res, toks) if k > 1 and r["chunks"]]
            gaps = [b - x for r in res for x, b in zip(r["chunks"], r["chunks"][1:])]
            tau = (a["acc"] + a["steps"]) / max(a["steps"], 1)
            rows.append([n, str(c), f"{sum(toks) / a['wall']:.1f}", f"{1000 * _pct(ttft, 0.5):.0f} / "
                         f"{1000 * _pct(ttft, 0.99):.0f}", f"{1000 * _pct(tpot, 0.5):.1f} / {1000 * _pct(tpot, 0.99):.1f}",
                         f"{1000 * _pct(gaps, 0.99):.0f}", f"{tau:.2f}", str(len(res))])
    for url, server, worker in servers.values():
        server.should_exit = True
        worker.close()
    # the naive server: HF generate, one request after the other
    import torch

    t0 = time.perf_counter()
    total, waits, per, service = 0, [], [], []
    for m in prompts:
        enc = tok.apply_chat_template(m, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        s = time.perf_counter()
        with torch.no_grad():
            out = target.generate(**enc, max_new_tokens=args.max_tokens, do_sample=False, eos_token_id=im_end)
        n = out.shape[1] - enc["input_ids"].shape[1]
        total += n
        per.append((time.perf_counter() - s) / max(n, 1))
        service.append(time.perf_counter() - s)
        waits.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    for c in (c for c in levels if isinstance(c, int)):  # the i-th of a batch of c waits for those before it
        ttft = [waits[i] - (waits[i - c] if i >= c else 0.0) for i in range(len(waits))]
        rows.append(["naive server (HF generate, one at a time)", str(c), f"{total / wall:.1f}",
                     f"{1000 * _pct(ttft, 0.5):.0f} / {1000 * _pct(ttft, 0.99):.0f} (whole answers)", f"{1000 * statistics.median(per):.1f} / "
                     f"{1000 * _pct(per, 0.99):.1f}", "–", "1.00", str(len(prompts))])
    import random

    for c in (c for c in levels if not isinstance(c, int)):  # FIFO one at a time, from the measured times
        ttft, span = [], 0.0
        for rep in range(args.repeats):  # the arrivals the servers saw (seeded per repeat)
            gaps, due, free = random.Random(rep).expovariate, 0.0, 0.0
            for sv in service:
                free = max(due, free) + sv
                ttft.append(free - due)
                due += gaps(float(c[:-2]))
            span += free
        rows.append(["naive server (HF generate, one at a time; its queue simulated from the measured times)", c,
                     f"{args.repeats * total / span:.1f}", f"{1000 * _pct(ttft, 0.5):.0f} / "
                     f"{1000 * _pct(ttft, 0.99):.0f} (whole answers)", "–", "–", "1.00", str(len(prompts))])
    text = "\n".join([
        args.section, "",
        f"{provenance('serve', argv, load_before)} SmolLM2-135M-Instruct as loaded (float32, unpacked); "
        f"{args.requests} ShareGPT dev first turns per level, greedy, up to {args.max_tokens} tokens, streamed; "
        f"the server decodes up to {args.max_rows} requests as one batch; with prompt lookup or no drafter, "
        "requests that arrive while it runs join it between verification steps.", "",
        *md_table(["server", "concurrency (or arrivals)", "throughput (tok/s)", "TTFT p50 / p99 (ms)", "TPOT p50 / p99 (ms)",
                   "ITL p99 (ms)", "τ", "requests"], rows), "",
    ]) + "\n"
    report(text, args.out, args.section)
    return 0


if __name__ == "__main__":
    sys.exit(main())

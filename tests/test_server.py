"""`river serve` end to end: a real uvicorn server on a free loopback port (in a thread), the
official openai client and raw httpx against it, and a reference Engine on the same tiny model
as the oracle for every greedy output."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from river import Engine, EngineConfig, ExitConfig, SamplingParams  # noqa: E402
from river.server import ServerConfig, ServerHandle, add_serve_parser  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# The exact fp32 oracle path: served text must equal Engine.generate's token for token, and bf16
# rounding depends on the batch a row shares (a near-tie of the random tiny model can flip).
ENGINE = EngineConfig(
    device="cpu", block_size=8, num_blocks=512, max_num_seqs=64, dtype=torch.float32,
    ops="reference",
)  # fmt: skip
# On the 2-layer tiny model a river row may exit after layer 1; 0.5 is far from the cosines it
# sees, so the exit decision cannot flip with batch composition.
RIVER = {"mode": "river", "threshold": 0.5, "min_layer": 1}
EXITS = {
    "full": (None, ExitConfig("full")),
    "w4": ("w4", ExitConfig("w4")),
    "river": (RIVER, ExitConfig("river", 0.5, 1)),
}


@pytest.fixture(scope="module")
def ref(tiny_dir):
    engine = Engine(str(tiny_dir), ENGINE)
    engine.ensure_river(progress=False)  # also writes the twins' cache the server then loads
    return engine


@pytest.fixture(scope="module")
def server(tiny_dir, ref):
    cfg = ServerConfig(model=str(tiny_dir), engine=ENGINE, api_key=KEY, served_model_name="tiny")
    handle = ServerHandle(cfg).start(timeout=120)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy(max_tokens, exit="full", **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0, exit=EXITS[exit][1], **kw)


def extra(exit="full", **kw):
    body = dict(kw)
    if EXITS[exit][0] is not None:
        body["exit"] = EXITS[exit][0]
    return body


# ---------------------------------------------------------------------------- metrics parsing
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
_SAMPLE = re.compile(
    rf"^({_NAME})(?:\{{({_LABEL}(?:,{_LABEL})*)\}})? "
    r"([-+]?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?|Inf)|NaN)$"
)
_TYPE = re.compile(rf"^# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)$")
_HELP = re.compile(rf"^# HELP ({_NAME}) .*$")


def parse_metrics(text: str) -> dict:
    """Strict Prometheus text format: {(name, ((label, value), ...)): float}. Every sample must
    belong to a family whose TYPE came before it."""
    assert text.endswith("\n")
    types, out = {}, {}
    for line in text.splitlines():
        if m := _TYPE.match(line):
            assert m[1] not in types, f"family declared twice: {line}"
            types[m[1]] = m[2]
            continue
        if _HELP.match(line):
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        name, labels, value = m[1], m[2], m[3]
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"sample before its TYPE: {line}"
        if types[family] == "counter":
            assert name.endswith("_total"), f"counter without _total: {name}"
        pairs = tuple(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels or ""))
        assert (name, pairs) not in out, f"duplicate sample {line}"
        out[(name, pairs)] = float(value)
    return out


def metrics(server) -> dict:
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return parse_metrics(r.text)


def metric(m, name, **labels) -> float:
    return m[(name, tuple(labels.items()))]


def wait_idle(server, timeout=10.0) -> dict:
    """Metrics once nothing runs, waits or holds a KV block (aborts land between steps)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        idle = (
            metric(m, "river_requests_running") == 0
            and metric(m, "river_requests_waiting") == 0
            and metric(m, "river_kv_blocks_used") == 0
        )
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.02)


# ---------------------------------------------------------------------------- outputs
PROMPTS = ["def fib(n):", "The capital of France is", "¿Qué tal?", "x = [1, 2, 3]\nfor i in"]


@pytest.mark.parametrize("exit", ["full", "w4", "river"])
def test_completions_equal_engine_generate(client, ref, exit):
    prompt = PROMPTS[["full", "w4", "river"].index(exit)]
    want = ref.generate(prompt, greedy(12, exit, ignore_eos=True))[0]
    r = client.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        extra_body=extra(exit, ignore_eos=True),
    )
    assert r.object == "text_completion" and r.model == "tiny"
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert r.river["mean_backbone_layers"] == pytest.approx(want.mean_backbone_layers, abs=1e-3)
    assert r.river["exit"]["mode"] == exit

    pieces, usages, finish = [], [], []
    for c in client.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra(exit, ignore_eos=True),
    ):
        if c.usage is not None:
            usages.append(c.usage)
            assert c.choices == []
            continue
        pieces.append(c.choices[0].text)
        finish.append(c.choices[0].finish_reason)
    assert "".join(pieces) == want.text
    assert finish[-1] == "length" and set(finish[:-1]) <= {None}
    assert len(usages) == 1 and usages[0].completion_tokens == 12


def test_chat_equal_engine_chat(client, ref):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2 + 2?"},
    ]
    want = ref.chat(messages, greedy(10, ignore_eos=True))
    r = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=10,
        temperature=0,
        extra_body=extra(ignore_eos=True),
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == 10

    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        extra_body=extra(ignore_eos=True),
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # include_usage not asked

    # Text content parts read as the same conversation.
    parts = [messages[0], {"role": "user", "content": [{"type": "text", "text": "What is 2 + 2?"}]}]
    r2 = client.chat.completions.create(
        model="tiny",
        messages=parts,
        max_tokens=10,
        temperature=0,
        extra_body=extra(ignore_eos=True),
    )
    assert r2.choices[0].message.content == want.text


def test_stop_strings_and_seeded_sampling(client, ref):
    full = ref.generate("Hi", greedy(20, ignore_eos=True))[0].text
    stop = full[3:5]
    want = ref.generate("Hi", greedy(20, ignore_eos=True, stop=[stop]))[0]
    assert want.finish_reason == "stop"
    body = dict(model="tiny", prompt="Hi", max_tokens=20, temperature=0, stop=[stop])
    r = client.completions.create(**body, extra_body={"ignore_eos": True})
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(**body, stream=True, extra_body={"ignore_eos": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "stop"

    sp = SamplingParams(
        max_tokens=10, temperature=0.9, top_p=0.9, top_k=40, seed=11, ignore_eos=True
    )
    want = ref.generate("Once upon a time", sp)[0].text
    r = client.completions.create(
        model="tiny",
        prompt="Once upon a time",
        max_tokens=10,
        temperature=0.9,
        top_p=0.9,
        seed=11,
        extra_body={"top_k": 40, "ignore_eos": True},
    )
    assert r.choices[0].text == want


def test_token_id_prompt_and_default_exit(tiny_dir, ref):
    """A prompt of token ids; a server whose default exit is river applies it to requests that
    send none, and fills the fields a partial exit object leaves out."""
    ids = ref.tokenizer.encode("def add(a, b):")
    cfg = ServerConfig(model=str(tiny_dir), engine=ENGINE, default_exit=ExitConfig("river", 0.5, 1))
    with ServerHandle(cfg) as h:
        c = openai.OpenAI(base_url=h.url + "/v1", api_key="unused", max_retries=0)
        for body, mode in [
            ({}, "river"),
            ({"exit": {"mode": "river"}}, "river"),
            ({"exit": "full"}, "full"),
        ]:
            want = ref.generate([ids], greedy(8, mode, ignore_eos=True))[0]
            r = c.completions.create(
                model=tiny_dir.name,
                prompt=ids,
                max_tokens=8,
                temperature=0,
                extra_body={**body, "ignore_eos": True},
            )
            assert r.choices[0].text == want.text
            assert r.river["exit"] == {
                "mode": mode,
                "threshold": 0.5,
                "min_layer": 1,
                "policy": "per_row",
            }
            assert r.river["mean_backbone_layers"] == pytest.approx(want.mean_backbone_layers)


# ---------------------------------------------------------------------------- batching
def test_concurrent_streams_share_batches(server, ref):
    """32 streaming clients at once, mixed exits and lengths: every output equals the engine's
    own greedy output, the decode steps held several rows, and the pool ends empty."""
    modes = ["full", "w4", "river"]
    jobs = []
    for i in range(32):
        mode = modes[i % 3]
        prompt = f"Request {i}: " + "lorem ipsum " * (i % 5)
        n = 6 + (i * 7) % 30
        jobs.append((prompt, n, mode))
    wants = [ref.generate(p, greedy(n, mode, ignore_eos=True))[0].text for p, n, mode in jobs]
    before = metrics(server)

    async def one(c, prompt, n, mode):
        stream = await c.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=n,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra(mode, ignore_eos=True),
        )
        text, use = [], None
        async for ch in stream:
            if ch.usage is not None:
                use = ch.usage
            else:
                text.append(ch.choices[0].text)
        return "".join(text), use

    async def run_all():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        try:
            return await asyncio.gather(*(one(c, *j) for j in jobs))
        finally:
            await c.close()

    got = asyncio.run(run_all())
    for (text, use), want, (_, n, _) in zip(got, wants, jobs):
        assert text == want
        assert use.completion_tokens == n
    after = wait_idle(server)
    steps = metric(after, "river_decode_steps_total") - metric(before, "river_decode_steps_total")
    rows = metric(after, "river_decode_rows_total") - metric(before, "river_decode_rows_total")
    assert rows == sum(n - 1 for _, n, _ in jobs)  # every token after the first is a decode row
    assert rows / steps > 2, f"{rows} decode rows in {steps} steps: the clients were not batched"
    assert metric(after, "river_decode_batch_rows_max") > 1
    assert metric(after, "river_kv_blocks_used") == 0
    assert metric(after, "river_kv_blocks_total") == ENGINE.num_blocks


def test_disconnects_free_blocks(server, ref):
    """Streaming and non-streaming clients that leave mid-generation are aborted and give back
    their blocks; the clients generating beside them get their full output."""
    keep = [(f"keep {i}", 30) for i in range(4)]
    wants = [ref.generate(p, greedy(n, ignore_eos=True))[0].text for p, n in keep]
    before = metrics(server)

    async def leaver(c):
        body = {"model": "tiny", "prompt": "leave", "max_tokens": 240, "temperature": 0}
        body.update(stream=True, ignore_eos=True)
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.aiter_lines()
            got = 0
            async for line in lines:
                got += line.startswith("data: ")
                if got == 2:
                    return  # closes the connection mid-stream

    async def impatient(c):
        body = {"model": "tiny", "prompt": "wait", "max_tokens": 240, "temperature": 0}
        body["ignore_eos"] = True
        with pytest.raises(httpx.ReadTimeout):
            await c.post("/v1/completions", json=body, timeout=0.15)

    async def keeper(c, prompt, n):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0}
        body.update(stream=True, ignore_eos=True)
        text = []
        async with c.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text.append(json.loads(line[6:])["choices"][0]["text"])
        return "".join(text)

    async def run_all():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as c:
            tasks = [leaver(c) for _ in range(3)] + [impatient(c) for _ in range(2)]
            return await asyncio.gather(*tasks, *(keeper(c, p, n) for p, n in keep))

    got = asyncio.run(run_all())[5:]
    assert got == wants
    after = wait_idle(server)
    aborted = metric(after, "river_requests_total", finish_reason="abort") - metric(
        before, "river_requests_total", finish_reason="abort"
    )
    assert aborted == 5
    # The leavers stopped far short of their 240 tokens each.
    generated = metric(after, "river_generation_tokens_total") - metric(
        before, "river_generation_tokens_total"
    )
    assert generated < 4 * 30 + 5 * 120
    assert metric(after, "river_kv_blocks_used") == 0


# ---------------------------------------------------------------------------- bad input
LONG = "hello " * 300  # over the tiny model's 256-token context
BAD = [
    ("not json", None, 400, None),
    ("[1, 2]", None, 400, None),
    ({"prompt": "x", "max_tokens": 0}, None, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "5"}, None, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, None, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, None, 400, "top_p"),
    ({"prompt": "x", "top_k": -2}, None, 400, "top_k"),
    ({"prompt": "x", "seed": -1}, None, 400, "seed"),
    ({"prompt": "x", "n": 2}, None, 400, "n"),
    ({"prompt": "x", "stop": [""]}, None, 400, "stop"),
    ({"prompt": "x", "stream": "yes"}, None, 400, "stream"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, None, 400, "stream_options"),
    ({"prompt": "x", "logprobs": 2}, None, 400, "logprobs"),
    ({"prompt": ""}, None, 400, "prompt"),
    ({"prompt": ["a", "b"]}, None, 400, "prompt"),
    ({"prompt": [1, 10**9]}, None, 400, None),  # refused by the engine thread: out of vocab
    ({"prompt": LONG}, None, 400, "prompt"),
    ({"prompt": "x", "exit": {"mode": "early"}}, None, 400, "exit.mode"),
    ({"prompt": "x", "exit": "nope"}, None, 400, "exit.mode"),
    ({"prompt": "x", "exit": {"mode": "river", "threshold": 2}}, None, 400, "exit"),
    ({"prompt": "x", "exit": {"mode": "river", "min_layer": -1}}, None, 400, "exit"),
    ({"prompt": "x", "exit": {"mode": "river", "min_layer": "4"}}, None, 400, "exit.min_layer"),
    ({"prompt": "x", "exit": {"mode": "river", "depth": 3}}, None, 400, "exit"),
    ({"prompt": "x", "model": "gpt-4"}, None, 404, "model"),
    ({"prompt": "x"}, {}, 401, None),
    ({"prompt": "x"}, {"Authorization": "Bearer wrong"}, 401, None),
    ({"messages": "hi"}, "chat", 400, "messages"),
    ({"messages": [{"content": "hi"}]}, "chat", 400, "messages[0]"),
    ({"messages": [{"role": "user", "content": LONG}]}, "chat", 400, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "chat", 400, None),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{}]}, "chat", 400, "tools"),
]


@pytest.mark.parametrize("body, variant, status, param", BAD)
def test_bad_input_gets_openai_error(server, body, variant, status, param):
    headers = AUTH if variant in (None, "chat") else variant
    path = "/v1/chat/completions" if variant == "chat" else "/v1/completions"
    if isinstance(body, dict):
        body = json.dumps({"model": "tiny", **body})
    r = httpx.post(
        server.url + path,
        content=body,
        headers={**headers, "Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if body.find("hello hello") >= 0:
        assert err["code"] == "context_length_exceeded"
    # ... and the server keeps serving.
    ok = httpx.post(
        server.url + "/v1/completions",
        json={"model": "tiny", "prompt": "ok", "max_tokens": 2, "temperature": 0},
        headers=AUTH,
        timeout=30,
    )
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_unknown_route_and_models(server):
    r = httpx.get(server.url + "/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    models = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    h = httpx.get(server.url + "/health")
    assert h.status_code == 200 and h.json() == {"status": "ok"}


def test_loading_then_step_failure(tiny_dir):
    """503 while the engine loads; a failing engine step fails only its batch (500) and the next
    request is served from a pool with every block back."""
    release = threading.Event()
    holder = {}

    def factory():
        release.wait(30)
        engine = Engine(str(tiny_dir), ENGINE)
        real_step = engine.step

        def step():
            if holder.pop("fail", False):
                raise RuntimeError("injected failure")
            return real_step()

        engine.step = step
        return engine

    h = ServerHandle(ServerConfig(model=str(tiny_dir), engine=ENGINE), engine_factory=factory)
    h.start(wait_ready=False)
    try:
        body = {"prompt": "x", "max_tokens": 3}
        assert httpx.get(h.url + "/health").status_code == 503
        r = httpx.post(h.url + "/v1/completions", json=body)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        assert httpx.get(h.url + "/v1/models").status_code == 503
        assert httpx.get(h.url + "/metrics").status_code == 200
        release.set()
        assert h.engine_loop.ready.wait(60) and h.engine_loop.state == "ready"
        holder["fail"] = True
        r = httpx.post(h.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "injected failure" in r.json()["error"]["message"]
        r = httpx.post(h.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        m = wait_idle(h)
        assert metric(m, "river_kv_blocks_used") == 0
        assert metric(m, "river_requests_total", finish_reason="error") == 1
    finally:
        release.set()
        h.stop()


# ---------------------------------------------------------------------------- metrics
def test_metrics_count_served_tokens(server, client):
    before = metrics(server)
    served_prompt = served = 0
    for i, n in enumerate([3, 7, 11]):
        r = client.completions.create(
            model="tiny",
            prompt=f"count {i}",
            max_tokens=n,
            temperature=0,
            extra_body={"exit": "w4"},
        )
        served_prompt += r.usage.prompt_tokens
        served += r.usage.completion_tokens
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0
    )
    served_prompt += r.usage.prompt_tokens
    served += r.usage.completion_tokens
    after = metrics(server)  # no waiting: the counters are published before tokens go out

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("river_generation_tokens_total") == served
    assert delta("river_prompt_tokens_total") == served_prompt
    finished = sum(delta("river_requests_total", finish_reason=f) for f in ("stop", "length"))
    assert finished == 4
    # The exit histogram is cumulative over le="0".."2", +Inf, with _count and _sum.
    hist = wait_idle(server)
    buckets = [metric(hist, "river_exit_backbone_layers_bucket", le=str(k)) for k in range(3)]
    inf = metric(hist, "river_exit_backbone_layers_bucket", le="+Inf")
    assert buckets == sorted(buckets) and buckets[-1] == inf
    assert inf == metric(hist, "river_exit_backbone_layers_count") > 0
    assert buckets[0] > 0  # the w4 requests ran no backbone layer in decode
    assert metric(hist, "river_decode_tokens_per_second") >= 0


# ---------------------------------------------------------------------------- command line
def test_serve_parser():
    import argparse

    from river.exits import MODES, POLICIES
    from river.server import EXIT_MODES, EXIT_POLICIES

    assert EXIT_MODES == MODES and EXIT_POLICIES == POLICIES
    # Building the parser must not import torch (the `river` command line's --help stays fast).
    code = "import sys, river.server; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr

    p = argparse.ArgumentParser(prog="river")
    add_serve_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(
        ["serve", "some/dir", "--port", "9001", "--exit", "river", "--min-layer", "3"]
    )
    assert args.model == "some/dir" and args.port == 9001 and args.func.__name__ == "run_serve"
    from river.server import config_from_args

    cfg = config_from_args(args)
    assert cfg.default_exit == ExitConfig("river", min_layer=3) and cfg.api_key is None
    args = p.parse_args(["serve"])
    assert args.model is None and args.host == "127.0.0.1" and args.port == 8000


def test_serve_subprocess(tiny_dir, ref):
    """`python -m river.server` (what `river serve` runs): serves, then exits 0 on SIGINT."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "river.server", str(tiny_dir), "--port", str(port)]
    cmd += ["--device", "cpu", "--log-level", "warning", "--served-model-name", "t"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        want = ref.generate("def f(x):", greedy(5, ignore_eos=True))[0].text
        body = {"model": "t", "prompt": "def f(x):", "max_tokens": 5, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json={**body, "ignore_eos": True}, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_serve_bad_model_exits_2(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    missing = str(tmp_path / "missing")
    r = subprocess.run(
        [sys.executable, "-m", "river.server", missing, "--port", "0", "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert r.returncode == 2 and "does not exist" in r.stderr

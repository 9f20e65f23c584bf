"""`river serve` end to end: a real uvicorn server on a free loopback port (in a thread), the
official openai client and raw httpx against it, and a reference Engine on the same tiny model
as the oracle for every greedy output."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_helpers import (  # noqa: E402
    AUTH,
    ENGINE,
    KEY,
    extra,
    greedy,
    metric,
    metrics,
    reference_engine,
    wait_idle,
)

from river import SamplingParams  # noqa: E402
from river.server import ServerConfig, ServerHandle  # noqa: E402


@pytest.fixture(scope="module")
def ref(tiny_dir):
    return reference_engine(tiny_dir)


@pytest.fixture(scope="module")
def server(tiny_dir, ref):
    cfg = ServerConfig(model=str(tiny_dir), engine=ENGINE, api_key=KEY, served_model_name="tiny")
    handle = ServerHandle(cfg).start(timeout=120)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


# ---------------------------------------------------------------------------- outputs
PROMPTS = ["def fib(n):", "The capital of France is", "¿Qué tal?", "x = [1, 2, 3]\nfor i in"]


@pytest.mark.parametrize("exit", ["full", "w4", "river", "lossless"])
def test_completions_equal_engine_generate(client, ref, exit):
    prompt = PROMPTS[["full", "w4", "river", "lossless"].index(exit) % len(PROMPTS)]
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

    def ask(msgs, **kw):
        return client.chat.completions.create(
            model="tiny",
            messages=msgs,
            max_tokens=10,
            temperature=0,
            extra_body=extra(ignore_eos=True),
            **kw,
        )

    r = ask(messages)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == 10

    chunks = list(ask(messages, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # include_usage not asked

    # Text content parts read as the same conversation.
    parts = [messages[0], {"role": "user", "content": [{"type": "text", "text": "What is 2 + 2?"}]}]
    r2 = ask(parts)
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
    ({"messages": [{"role": "user"}]}, "chat", 400, "messages[0].content"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "chat", 400, "messages[0].role"),
    # past int64 / int32: used to pass, then fail the engine step for every row batched with it
    ({"prompt": "x", "temperature": 0.5, "seed": 2**63}, None, 400, "seed"),
    ({"prompt": "x", "temperature": 0.5, "top_k": 2**31}, None, 400, "top_k"),
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

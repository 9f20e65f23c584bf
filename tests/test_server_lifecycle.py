"""`river serve` servers that a test starts and stops itself: a server whose default exit is
river, one that is still loading and then has an engine step fail, the `serve` command line, and
`python -m river.server` in a subprocess (SIGINT ends it with 0, a missing model with 2)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_helpers import ENGINE, greedy, metric, reference_engine, wait_idle  # noqa: E402

from river import Engine, EngineConfig, ExitConfig  # noqa: E402
from river.server import ServerConfig, ServerHandle, add_serve_parser  # noqa: E402


@pytest.fixture(scope="module")
def ref(tiny_dir):
    return reference_engine(tiny_dir)


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


def test_chat_without_max_tokens_fits_a_small_pool(tiny_dir):
    """A chat request without max_tokens defaults to the rest of the context window, or of the
    KV pool where that is smaller: it used to ask for the whole window and be refused by a pool
    that cannot hold it (kv_cache_exceeded), however short the conversation."""
    from dataclasses import replace

    engine = replace(ENGINE, num_blocks=6)  # 48 tokens of KV, a 256-token window
    with ServerHandle(ServerConfig(model=str(tiny_dir), engine=engine)) as h:
        body = {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0}
        r = httpx.post(h.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] <= 48 + 1


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
    assert cfg.engine.river_precision == EngineConfig().river_precision
    args = p.parse_args(["serve", "--river-precision", "mix:0.4"])
    assert config_from_args(args).engine.river_precision == "mix:0.4"
    assert config_from_args(args).engine.tensor_parallel_size == 1
    assert config_from_args(args).engine.river_calibration == EngineConfig().river_calibration
    args = p.parse_args(["serve", "--river-calibration", "none"])
    assert config_from_args(args).engine.river_calibration == "none"
    args = p.parse_args(["serve", "--tp", "2"])
    assert config_from_args(args).engine.tensor_parallel_size == 2
    args = p.parse_args(["serve"])
    assert args.model is None and args.host == "127.0.0.1" and args.port == 8000
    assert config_from_args(args).warmup_max_batch == 8
    args = p.parse_args(["serve", "--torch-compile", "--warmup-max-batch", "0"])
    cfg = config_from_args(args)
    assert cfg.engine.torch_compile and cfg.warmup_max_batch == 0
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="warmup_max_batch"):
            ServerConfig(warmup_max_batch=bad)


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


@pytest.mark.parametrize("port", ["-1", "65536", "http"])
def test_serve_bad_port_is_one_line(port):
    r = subprocess.run(
        [sys.executable, "-m", "river", "serve", "--port", port],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and "--port" in r.stderr and "Traceback" not in r.stderr


def test_serve_busy_port_exits_2_before_loading(tmp_path):
    """A port already in use is one error line and status 2, before any model is loaded (the
    model path does not exist: a load would fail differently)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "river.server", str(tmp_path / "missing"), "--port", str(port)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr
    assert "does not exist" not in r.stderr


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

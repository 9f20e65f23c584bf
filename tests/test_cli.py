"""The `river` command line, run as a subprocess like a user would."""

import json
import os
import subprocess
import sys

import pytest


def river(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "river", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.mark.parametrize("sub", [[], ["generate"], ["convert"]])
def test_help(sub):
    r = river(*sub, "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: river" in r.stdout
    if sub == ["generate"]:
        for flag in (
            "--model",
            "--max-tokens",
            "--temperature",
            "--top-p",
            "--seed",
            "--chat",
            "--json",
            "--exit",
        ):
            assert flag in r.stdout


def test_generate_json(tiny_dir):
    r = river(
        "generate",
        "--model",
        str(tiny_dir),
        "--max-tokens",
        "5",
        "--device",
        "cpu",
        "--json",
        "Hello",
        "def f(x):",
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["prompt"] for x in rows] == ["Hello", "def f(x):"]
    for x in rows:
        assert 1 <= len(x["token_ids"]) <= 5 and isinstance(x["text"], str)
        assert x["tokens_per_s"] > 0


def test_generate_bad_input_exit_code(tiny_dir, tmp_path):
    r = river("generate", "--model", str(tmp_path / "missing"), "hi")
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = river("generate", "--model", str(tiny_dir), "--max-tokens", "0", "--device", "cpu", "hi")
    assert r.returncode == 2 and "max_tokens" in r.stderr


def test_convert_errors(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    r = river("convert", str(bad), str(tmp_path / "out"))
    assert r.returncode == 2 and "bad.gguf" in r.stderr

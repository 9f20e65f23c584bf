"""The `river` command line, run as a subprocess like a user would (and in-process where a test
needs to see what reached the engine)."""

import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from river import Engine, cli

FOOTER = re.compile(
    r"^\[(\d+) tokens, [\d.]+ tok/s, first token [\d.]+ s, finish: (length|stop)"
    r"(, backbone layers [\d.]+/\d+)?\]$"
)


def river(*args, timeout=300, stdin=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "river", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})},
    )


def run_main(*args, capsys, stdin=None, monkeypatch=None):
    """cli.main in this process (no interpreter start-up): (status, stdout, stderr)."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        code = cli.main(list(args))
    except SystemExit as e:  # argparse's own exits (bad flags, --help)
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def tiny_args(tiny_dir, *args):
    return ("generate", "--model", str(tiny_dir), "--device", "cpu", *args)


def footers(stderr):
    return [m for m in (FOOTER.match(line) for line in stderr.splitlines()) if m]


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
            "--ignore-eos",
            "--prompt-file",
            "--threads",
        ):
            assert flag in r.stdout
    if sub == ["convert"]:
        assert "--overwrite" in r.stdout


def test_version():
    r = river("--version")
    assert r.returncode == 0 and re.match(r"river \d+\.\d+\.\d+ \(torch ", r.stdout), r.stdout


def test_generate_json(tiny_dir):
    r = river(*tiny_args(tiny_dir, "--max-tokens", "5", "--json", "Hello", "def f(x):"))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["prompt"] for x in rows] == ["Hello", "def f(x):"]
    for x in rows:
        assert 1 <= len(x["token_ids"]) <= 5 and isinstance(x["text"], str)
        assert x["tokens_per_s"] >= 0 and x["first_token_s"] > 0
        assert x["num_tokens"] == len(x["token_ids"])


def test_plain_and_stream_share_the_output_contract(tiny_dir, capsys):
    """Prompt echo on stdout, one footer per prompt on stderr, the same text streamed or not,
    one prompt or several."""
    prompts = ["Hello", "def f(x):"]
    base = tiny_args(tiny_dir, "--max-tokens", "6", "--ignore-eos", *prompts)
    plain = run_main(*base, capsys=capsys)
    stream = run_main(*base, "--stream", capsys=capsys)
    for code, out, err in (plain, stream):
        assert code == 0, err
        fs = footers(err)
        assert len(fs) == 2 and all(f.group(1) == "6" for f in fs), err
        assert out.startswith("Hello")
        assert "\ndef f(x):" in out
    assert plain[1] == stream[1]


def test_stream_works_with_chat(tiny_dir, capsys):
    base = tiny_args(tiny_dir, "--chat", "--max-tokens", "5", "--ignore-eos", "What is 2+2?")
    plain = run_main(*base, capsys=capsys)
    stream = run_main(*base, "--stream", capsys=capsys)
    for code, out, err in (plain, stream):
        assert code == 0, err
        assert out.startswith("What is 2+2?\n")
        assert len(footers(err)) == 1
    assert plain[1] == stream[1]


def test_prompt_from_stdin_and_file(tiny_dir, tmp_path, capsys, monkeypatch):
    f = tmp_path / "prompt.txt"
    f.write_text("def f(x):")
    base = tiny_args(tiny_dir, "--max-tokens", "4", "--json")
    runs = [
        run_main(*base, "-", capsys=capsys, stdin="def f(x):", monkeypatch=monkeypatch),
        run_main(*base, "--prompt-file", str(f), capsys=capsys),
        run_main(*base, "def f(x):", capsys=capsys),
    ]
    rows = [json.loads(out) for _, out, _ in runs]
    assert rows[0]["token_ids"] == rows[1]["token_ids"] == rows[2]["token_ids"]
    assert rows[0]["prompt"] == "def f(x):"


@pytest.mark.parametrize(
    "args, flag",
    [
        (("--threshold", "5", "--exit", "river"), "--threshold"),
        (("--top-p", "0"), "--top-p"),
        (("--temperature", "-1"), "--temperature"),
        (("--top-k", "-2"), "--top-k"),
        (("--max-tokens", "0"), "--max-tokens"),
        (("--seed", "-1"), "--seed"),
        (("--seed", str(2**63)), "--seed"),
        (("--top-k", str(2**31)), "--top-k"),
        (("--threads", "0"), "--threads"),
        (("--exit", "bogus"), "--exit"),
        (("--min-layer", "999", "--exit", "river"), "--min-layer"),
        (("--stream", "--json"), "--stream"),
        (("--prompt-file", "/nonexistent/prompt.txt"), "--prompt-file"),
        (("--river-precision", "mix:3"), "--river-precision"),
        (("--river-precision", "w5"), "--river-precision"),
        (("--river-calibration", "wikitext"), "--river-calibration"),
        (("--tp", "0"), "--tp"),
        (("--tp", "3"), "tensor_parallel_size=3 does not divide the model's 2 KV heads"),
    ],
)
def test_bad_flag_is_one_line_and_status_2(tiny_dir, args, flag, capsys):
    code, _, err = run_main(*tiny_args(tiny_dir, *args, "hi"), capsys=capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], err


def test_bad_flag_from_a_real_process(tiny_dir):
    r = river(*tiny_args(tiny_dir, "--threshold", "5", "--exit", "river", "hi"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--threshold" in r.stderr
    assert "Traceback" not in r.stderr


def test_no_prompt_is_an_error(tiny_dir, capsys):
    code, _, err = run_main(*tiny_args(tiny_dir), capsys=capsys)
    assert code == 2 and "no prompt" in err


def test_generate_bad_model_exit_code(tmp_path):
    r = river("generate", "--model", str(tmp_path / "missing"), "hi")
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_every_flag_reaches_the_engine(tiny_dir, monkeypatch):
    seen = {}
    real = Engine.generate

    def spy(self, prompts, params=None, **kw):
        seen["params"], seen["engine"] = params, self
        return real(self, prompts, params, **kw)

    monkeypatch.setattr(Engine, "generate", spy)
    argv = tiny_args(
        tiny_dir,
        "--max-tokens",
        "3",
        "--temperature",
        "0",
        "--top-p",
        "0.5",
        "--top-k",
        "7",
        "--seed",
        "0",
        "--stop",
        "xyz",
        "--ignore-eos",
        "--exit",
        "river",
        "--threshold",
        "0",
        "--min-layer",
        "0",
        "--policy",
        "batch_min",
        "--threads",
        "1",
        "--river-precision",
        "w8",
        "--river-calibration",
        "random-tokens",
        "hi",
    )
    assert cli.main(list(argv)) == 0
    assert seen["engine"].config.river_precision == "w8"
    assert seen["engine"].config.river_calibration == "random-tokens"
    sp = seen["params"]
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.seed) == (3, 0.0, 0.5, 7, 0)
    assert sp.stop == ("xyz",) and sp.ignore_eos
    assert (sp.exit.mode, sp.exit.threshold, sp.exit.min_layer, sp.exit.policy) == (
        "river",
        0.0,
        0,
        "batch_min",
    )
    assert seen["engine"].num_threads == 1


def test_threshold_zero_is_not_dropped(tiny_dir, capsys):
    """--threshold 0 exits at the first allowed layer; --threshold 1 never exits."""

    def layers(threshold):
        args = ("--exit", "river", "--min-layer", "1", "--threshold", threshold)
        base = ("--max-tokens", "6", "--ignore-eos", "--json", "Hello")
        code, out, err = run_main(*tiny_args(tiny_dir, *args, *base), capsys=capsys)
        assert code == 0, err
        return json.loads(out)["mean_backbone_layers"]

    # The first token comes from the 2-layer prefill, the other 5 from decode steps.
    assert layers("0") == pytest.approx((2 + 5 * 1) / 6, abs=1e-3)
    assert layers("1") == pytest.approx(2.0)


def test_lossless_flags(tiny_dir, capsys):
    """--exit lossless gives full's text, with its draft statistics in --json and the footer."""
    base = ("--max-tokens", "12", "--ignore-eos", "--temperature", "0", "Hello")
    code, full_out, err = run_main(*tiny_args(tiny_dir, "--json", *base), capsys=capsys)
    assert code == 0, err
    ll = ("--exit", "lossless", "--min-layer", "1", "--draft", "w4", "--draft-len", "3")
    code, out, err = run_main(*tiny_args(tiny_dir, *ll, "--json", *base), capsys=capsys)
    assert code == 0, err
    row, full = json.loads(out), json.loads(full_out)
    assert row["token_ids"] == full["token_ids"]
    assert row["verify_passes"] >= 1 and row["draft_tokens"] >= row["accepted_tokens"]
    code, out, err = run_main(*tiny_args(tiny_dir, *ll, *base), capsys=capsys)
    assert code == 0 and "tokens per verify" in err
    bad = tiny_args(tiny_dir, "--exit", "lossless", "--draft-len", "0", "hi")
    code, _, err = run_main(*bad, capsys=capsys)
    assert code == 2 and "--draft-len" in err


def test_first_river_use_says_once_where_the_twins_go(tiny_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model, ignore=shutil.ignore_patterns("river-*"))
    args = (
        "generate",
        "--model",
        str(model),
        "--device",
        "cpu",
        "--exit",
        "river",
        "--min-layer",
        "1",
    )
    first = river(*args, "--max-tokens", "2", "hi")
    assert first.returncode == 0, first.stderr
    said = [ln for ln in first.stderr.splitlines() if "building the river twins" in ln]
    assert len(said) == 1 and str(model) in said[0]
    assert len(first.stderr.strip().splitlines()) == 2  # that line and the footer
    second = river(*args, "--max-tokens", "2", "hi")
    assert second.returncode == 0 and "building" not in second.stderr


def test_convert_overwrite(default_gguf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    r = river("convert", str(default_gguf), str(out), "--quiet")
    assert r.returncode == 2 and "--overwrite" in r.stderr
    r = river("convert", str(default_gguf), str(out), "--quiet", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").exists() and not (out / "old.txt").exists()


def test_convert_errors(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    r = river("convert", str(bad), str(tmp_path / "out"))
    assert r.returncode == 2 and "bad.gguf" in r.stderr

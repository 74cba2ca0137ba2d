"""The ``jnnex`` command: train, sample, evaluate and sweep learning rates from the shell.

    jnnex train --model mlp --data census-first --out runs/mlp
    jnnex sample --from runs/mlp -n 20
    jnnex eval --from runs/mlp --data names.txt

A run directory holds ``config.json`` (model, data, vocabulary, settings), ``model.npz`` (parameters and model state),
``checkpoint.npz`` (everything needed to resume) and ``metrics.jsonl``. Every file is written atomically; arrays are
loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jnnex import checkpoint
from jnnex.data import CORPORA, Vocab, build_windows, load_words, split_words
from jnnex.lm import count_params, evaluate, sample_words
from jnnex.models import REGISTRY, get_spec
from jnnex.train import NonFiniteLossError, TrainConfig, fit, lr_find

# Model-config flags: CLI name -> config field. Each applies only to models whose config has that field.
MODEL_FLAGS = {"block_size": int, "n_embd": int, "n_hidden": int, "n_layers": int, "init": str, "l2": float,
               "smoothing": float}
TRAIN_FLAGS = {"steps": int, "batch_size": int, "lr": float, "optimizer": str, "eval_every": int, "seed": int}


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(f) for f in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions like 0.8,0.1,0.1, got {text!r}") from None


def _add_data(p, default="census-first"):
    p.add_argument("--data", default=default, metavar="PATH|" + "|".join(CORPORA),
                   help=f"a UTF-8 text file with one word per line, or an embedded corpus (default: {default})")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jnnex", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model and save it to --out",
                       description="Train a model. Unset flags take the model's defaults (or its --preset).")
    t.add_argument("--model", default="mlp", choices=sorted([*REGISTRY, "moons-mlp"]),
                   help="; ".join(f"{k}: {v.summary}" for k, v in REGISTRY.items())
                   + "; moons-mlp: MLP(2, [16, 16, 1]) on two moons, micrograd's demo (see --engine)")
    t.add_argument("--engine", choices=["scalar", "tensor", "autodiff"], default="tensor",
                   help="moons-mlp only: scalar Value engine, tensor hand-written backward, or jax.grad (default tensor)")
    _add_data(t)
    t.add_argument("--preset", help="a named set of settings for the model (mlp: lecture, improved)")
    t.add_argument("--out", help="run directory for config, parameters, checkpoint and metrics")
    t.add_argument("--resume", action="store_true", help="continue the run saved in --out (same result as unbroken)")
    t.add_argument("--split", type=_fractions, help="word fractions, e.g. 0.8,0.1,0.1 (bigram models: 1 = all words)")
    t.add_argument("--split-seed", type=int, default=42, help="seed of the word shuffle before splitting (default 42)")
    t.add_argument("--seed", type=int, help="seed of initialisation and minibatches (default 0)")
    t.add_argument("--steps", type=int, help="optimisation steps")
    t.add_argument("--batch-size", type=int, help="minibatch size")
    t.add_argument("--lr", type=float, help="initial learning rate (decays ×0.1 at half the steps for mlp)")
    t.add_argument("--optimizer", choices=["sgd", "momentum", "adam", "adamw"], help="optax optimiser")
    t.add_argument("--eval-every", type=int, help="evaluate and checkpoint every N steps")
    t.add_argument("--block-size", type=int, help="characters of context (mlp, bn-mlp, deep-mlp)")
    t.add_argument("--n-embd", type=int, help="embedding size per character (mlp, bn-mlp, deep-mlp)")
    t.add_argument("--n-hidden", type=int, help="hidden units (mlp, bn-mlp, deep-mlp)")
    t.add_argument("--n-layers", type=int, help="hidden layers (deep-mlp)")
    t.add_argument("--init", help="initialisation: lecture, softmax-fixed, tanh-fixed, kaiming (mlp); zeros, normal "
                                  "(neural-bigram)")
    t.add_argument("--l2", type=float, help="L2 regularisation weight on W (neural-bigram)")
    t.add_argument("--smoothing", type=float, help="add-k smoothing of the counts (bigram; default 1)")
    t.add_argument("--backward", choices=["autodiff", "manual"], default="autodiff",
                   help="gradients from jax.grad, or from the hand-written backward (mlp, bn-mlp, deep-mlp)")
    t.add_argument("--json", action="store_true", help="print the final metrics as one JSON object on stdout")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("sample", help="generate words from a trained model")
    s.add_argument("--from", dest="run", required=True, help="run directory written by `jnnex train --out`")
    s.add_argument("-n", type=int, default=20, help="number of words (default 20)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    s.add_argument("--temperature", type=float, default=1.0, help="divide the logits by this (default 1)")
    s.add_argument("--top-k", type=int, help="sample only among the k most likely characters")
    s.add_argument("--max-len", type=int, default=32, help="longest word generated (default 32)")

    e = sub.add_parser("eval", help="loss of a trained model on the train/dev/test splits of some data")
    e.add_argument("--from", dest="run", required=True, help="run directory written by `jnnex train --out`")
    _add_data(e, default=None)
    e.add_argument("--json", action="store_true", help="print the metrics as one JSON object")

    g = sub.add_parser("plot", help="PNG pictures of a run: loss curve, and the embeddings (mlp)  [needs jnnex[plot]]")
    g.add_argument("--from", dest="run", required=True, help="run directory written by `jnnex train --out`")
    g.add_argument("--out", help="directory for the PNG files (default: the run directory)")

    d = sub.add_parser("diagnose", help="train briefly with per-layer diagnostics; print them and draw the pictures",
                       description="Activation, gradient and update statistics per layer, computed inside the "
                                   "jitted step: a table at initialisation and at the end, and PNGs with --out.")
    d.add_argument("--model", default="deep-mlp", choices=["mlp", "bn-mlp", "deep-mlp"])
    _add_data(d)
    d.add_argument("--steps", type=int, default=1000, help="training steps (default 1000)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--gain", type=float, help="Kaiming gain of the hidden layers (bn-mlp, deep-mlp; default 5/3)")
    d.add_argument("--no-batchnorm", action="store_true", help="the same net without BatchNorm (bn-mlp, deep-mlp)")
    d.add_argument("--out", help="directory for activations.png, gradients.png, update_ratio.png [needs jnnex[plot]]")

    r = sub.add_parser("ladder", help="makemore part 3's ladder: original -> softmax fixed -> tanh fixed -> Kaiming "
                                      "-> + BatchNorm, each trained with the same budget")
    _add_data(r)
    r.add_argument("--steps", type=int, default=200_000, help="steps per rung (default 200000, the lecture's)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--json", action="store_true", help="print the rows as JSON")

    f = sub.add_parser("lr-find", help="exponential learning-rate sweep (the lecture's 1e-3 … 1)")
    f.add_argument("--model", default="mlp", choices=sorted(k for k, v in REGISTRY.items() if not v.fitted))
    _add_data(f)
    f.add_argument("--lo", type=float, default=1e-3)
    f.add_argument("--hi", type=float, default=1.0)
    f.add_argument("--steps", type=int, default=1000)
    f.add_argument("--batch-size", type=int, default=32)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--json", action="store_true", help="print {lrs, losses} as JSON")
    sub.add_parser("bench", add_help=False,
                   help="the benchmarks: hand-written backwards vs autodiff, training throughput (= python -m "
                        "benchmarks; `jnnex bench --help`)")
    return ap


# ----------------------------------------------------------------------------------------------------------------------


def _configs(args):
    spec = get_spec(args.model)
    model_over, train_over = {}, {}
    if args.preset:
        if args.preset not in spec.presets:
            raise ValueError(f"model {args.model!r} has no preset {args.preset!r}; it has {sorted(spec.presets)}")
        model_over, train_over = (dict(d) for d in spec.presets[args.preset])
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    for name in MODEL_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            if name not in fields:
                raise ValueError(f"--{name.replace('_', '-')} does not apply to model {args.model!r}")
            model_over[name] = value
    for name in TRAIN_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            train_over[name] = value
    steps = train_over.pop("steps", spec.train.steps)
    tcfg = _with_steps(dataclasses.replace(spec.train, **train_over), spec.train.steps, steps)
    return spec, model_over, tcfg


def _with_steps(tcfg: TrainConfig, default_steps: int, steps: int) -> TrainConfig:
    """``tcfg`` for a run of ``steps`` steps: the learning-rate boundaries keep their place as a fraction of the run
    (the lecture decays at half of it) and evaluation happens at least at the end."""
    return dataclasses.replace(tcfg, steps=steps, eval_every=min(tcfg.eval_every, steps),
                               lr_boundaries=tuple(b * steps // default_steps for b in tcfg.lr_boundaries))


def _data(source, vocab: Vocab | None, block_size: int, fractions, split_seed: int):
    words = load_words(source)
    vocab = vocab or Vocab.from_words(words)
    parts = split_words(words, fractions, split_seed) if len(fractions) > 1 else (words,)
    return vocab, [build_windows(p, vocab, block_size) for p in parts]


SPLIT_NAMES = ("train", "dev", "test")


def cmd_train_moons(args) -> int:
    """micrograd's demo: 100 points, noise 0.1, MLP(2, [16, 16, 1]), hinge + 1e-4 L2, lr 1.0 - 0.9 k/steps."""
    import jax.numpy as jnp

    from jnnex import mlp, nn
    from jnnex.data import make_moons

    seed = 0 if args.seed is None else args.seed
    steps = 100 if args.steps is None else args.steps
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    key = jax.random.key(seed)
    X, y01 = make_moons(100, 0.1, jax.random.fold_in(key, 0))
    y = 2.0 * y01 - 1.0
    params = mlp.init(jax.random.fold_in(key, 1), [2, 16, 16, 1])
    t0 = time.perf_counter()
    if args.engine == "scalar":
        model = nn.MLP(2, [16, 16, 1], params=params)
        losses, accs = nn.train_moons(model, X, y, steps=steps)
        final_loss, final_acc = nn.moons_loss(model, X, y)
        final_loss = final_loss.data
    else:
        x, yj = jnp.asarray(X, jnp.float32), jnp.asarray(y, jnp.float32)
        trained, losses, accs = mlp.train_moons(params, x, yj, steps=steps,
                                                engine="manual" if args.engine == "tensor" else "autodiff")
        final_loss, final_acc = float(mlp.loss_fn(trained, x, yj)), float(mlp.accuracy(trained, x, yj))
    seconds = time.perf_counter() - t0
    metrics = {"model": "moons-mlp", "engine": args.engine, "steps": steps, "seed": seed, "loss": float(final_loss),
               "accuracy": float(final_acc), "seconds": round(seconds, 3)}
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"moons-mlp ({args.engine}): loss {final_loss:.6f}  accuracy {final_acc:.0%}  ({steps} steps, {seconds:.2f} s)")
    return 0


def _manual(model):
    """The same model with its hand-written backward as the gradient (jax.grad nowhere in the training path)."""
    spec = get_spec(model.name)
    if spec.manual is None:
        raise ValueError(f"--backward manual: model {model.name!r} has no hand-written backward "
                         f"(available for {sorted(n for n, s in REGISTRY.items() if s.manual)})")
    return spec.manual(model.cfg)


def cmd_train(args) -> int:
    if args.model == "moons-mlp":
        return cmd_train_moons(args)
    spec, model_over, tcfg = _configs(args)
    fractions = args.split or spec.split
    words_vocab = Vocab.from_words(load_words(args.data))
    model = spec.build(spec.config(vocab_size=words_vocab.size, **model_over))
    if args.backward == "manual":
        model = _manual(model)
    vocab, splits = _data(args.data, words_vocab, model.block_size, fractions, args.split_seed)
    out = Path(args.out) if args.out else None
    meta = {"data": str(args.data), "vocab": vocab.chars, "boundary": vocab.boundary, "split": list(fractions),
            "split_seed": args.split_seed}
    log = sys.stderr if args.json else sys.stdout
    print(f"jnnex: {model.name} on {args.data} ({', '.join(f'{n} {len(s[1]):,}' for n, s in zip(SPLIT_NAMES, splits))}"
          f" examples, V={vocab.size}), seed {tcfg.seed}", file=log)
    t0 = time.perf_counter()
    interrupted = False
    if spec.fitted:
        from jnnex.bigram import fit_counts

        params, state = fit_counts(splits[0][0][:, 0], splits[0][1], vocab.size, model.cfg.smoothing), ()
        steps = 0
    else:
        try:
            res = fit(model, splits[0], tcfg, dev=splits[1] if len(splits) > 1 else None, out=out,
                      resume=args.resume, progress=not (args.no_progress or args.json), meta=meta)
        except NonFiniteLossError as e:
            print(f"jnnex: error: {e}", file=sys.stderr)
            return 1
        params, state, steps, interrupted = res.ts.params, res.ts.state, int(res.ts.step), res.interrupted
    seconds = time.perf_counter() - t0
    metrics = {"model": model.name, "backward": args.backward, "data": str(args.data), "steps": steps, "seed": tcfg.seed,
               "params": count_params(params), "seconds": round(seconds, 3)}
    for name, (X, Y) in zip(SPLIT_NAMES, splits):
        metrics[f"{name}_loss"] = evaluate(model, params, state, X, Y)
    if out is not None:
        checkpoint.save_pytree(out / "model.npz", (params, state))
        checkpoint.write_json(out / "config.json", {**meta, "model": model.name,
                                                    "model_config": dataclasses.asdict(model.cfg),
                                                    "train_config": dataclasses.asdict(tcfg), "step": steps})
        checkpoint.write_json(out / "metrics.json", metrics)
    if interrupted:
        print(f"jnnex: interrupted at step {steps}; saved to {out} (continue with --resume)", file=sys.stderr)
    if args.json:
        print(json.dumps(metrics))
    else:
        print("  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith("_loss"))
              + f"  ({steps} steps, {seconds:.1f} s)")
    return 130 if interrupted else 0


def load_trained(run: str | Path):
    """``(model, params, state, vocab, config)`` of a run directory written by ``jnnex train --out``."""
    run = Path(run)
    if not (run / "config.json").is_file() or not (run / "model.npz").is_file():
        raise ValueError(f"{str(run)!r} is not a finished jnnex run (expected config.json and model.npz)")
    cfg = checkpoint.read_json(run / "config.json")
    spec = get_spec(cfg["model"])
    model = spec.build(spec.config_cls(**cfg["model_config"]))
    params, state = checkpoint.load_pytree(run / "model.npz", model.init(jax.random.key(0)))
    return model, params, state, Vocab(cfg["vocab"], cfg["boundary"]), cfg


def cmd_sample(args) -> int:
    model, params, state, vocab, _ = load_trained(args.run)
    for word in sample_words(model, params, state, vocab, jax.random.key(args.seed), args.n, max_len=args.max_len,
                             temperature=args.temperature, top_k=args.top_k):
        print(word)
    return 0


def cmd_eval(args) -> int:
    model, params, state, vocab, cfg = load_trained(args.run)
    source = args.data or cfg["data"]
    _, splits = _data(source, vocab, model.block_size, tuple(cfg["split"]), cfg["split_seed"])
    metrics = {f"{n}_loss": evaluate(model, params, state, X, Y) for n, (X, Y) in zip(SPLIT_NAMES, splits)}
    print(json.dumps({"model": model.name, "data": str(source), **metrics}) if args.json
          else "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


def cmd_plot(args) -> int:
    from jnnex import plot

    model, params, _, vocab, _ = load_trained(args.run)
    out = Path(args.out or args.run)
    written = []
    if (Path(args.run) / "metrics.jsonl").is_file():
        written.append(plot.plot_loss(Path(args.run) / "metrics.jsonl", out / "loss.png"))
    if hasattr(params, "C"):
        written.append(plot.plot_embeddings(params.C, vocab, out / "embeddings.png"))
    for p in written:
        print(p)
    return 0


def cmd_diagnose(args) -> int:
    import jax.numpy as jnp

    from jnnex import diagnostics

    spec = get_spec(args.model)
    overrides = {}
    if args.gain is not None or args.no_batchnorm:
        if args.model == "mlp":
            raise ValueError("--gain and --no-batchnorm apply to bn-mlp and deep-mlp")
        if args.gain is not None:
            overrides["gain"] = args.gain
        if args.no_batchnorm:
            overrides.update(batchnorm=False, final_batchnorm=False)
    vocab, splits = _data(args.data, None, spec.config().block_size, spec.split, 42)
    model = spec.build(spec.config(vocab_size=vocab.size, **overrides))
    tcfg = dataclasses.replace(_with_steps(spec.train, spec.train.steps, args.steps), eval_every=args.steps,
                               seed=args.seed)
    res = fit(model, splits[0], tcfg, progress=False, eval_train=False, diagnostics=True)
    names = diagnostics.weight_names(res.ts.params)
    print(f"{model.name} {dict(overrides) or ''} on {args.data}: loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f}")
    print(f"\n-- step 0 (initialisation)\n{diagnostics.table(res.metrics, names, 0)}")
    print(f"\n-- step {args.steps - 1}\n{diagnostics.table(res.metrics, names, -1)}")
    if args.out:
        from jnnex import plot

        X, Y = (jnp.asarray(a[:512]) for a in splits[0])  # one batch of the training data, in train mode
        acts, act_grads = diagnostics.activation_gradients(model, res.ts.params, res.ts.state, X, Y)
        for p in plot.plot_diagnostics(res.metrics, names, acts, act_grads, args.out):
            print(p)
    return 0


# (rung, model, model overrides, the lecture's train/val)
LADDER = [
    ("original", "mlp", {"init": "lecture"}, (2.1245, 2.1682)),
    ("softmax fixed", "mlp", {"init": "softmax-fixed"}, (2.07, 2.13)),
    ("tanh fixed", "mlp", {"init": "tanh-fixed"}, (2.0356, 2.1027)),
    ("kaiming", "mlp", {"init": "kaiming"}, (2.0377, 2.1070)),
    ("+ batchnorm", "bn-mlp", {}, (2.0668, 2.1048)),
]


def cmd_ladder(args) -> int:
    rows = []
    for rung, name, overrides, lecture in LADDER:
        spec = get_spec(name)
        vocab, splits = _data(args.data, None, spec.config().block_size, spec.split, 42)
        model = spec.build(spec.config(vocab_size=vocab.size, **overrides))
        tcfg = dataclasses.replace(_with_steps(spec.train, spec.train.steps, args.steps), eval_every=args.steps,
                                   seed=args.seed)
        t0 = time.perf_counter()
        res = fit(model, splits[0], tcfg, dev=splits[1], progress=False)
        row = {"rung": rung, "model": name, **overrides, "train": res.evals[-1]["train_loss"],
               "val": res.evals[-1]["dev_loss"], "lecture_train": lecture[0], "lecture_val": lecture[1],
               "initial_loss": float(res.losses[0]), "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        if not args.json:
            print(f"{rung:<14} train {row['train']:.4f}  val {row['val']:.4f}   (lecture {lecture[0]:.4f} / "
                  f"{lecture[1]:.4f})  initial loss {row['initial_loss']:.2f}  {row['seconds']:.0f} s", flush=True)
    if args.json:
        print(json.dumps(rows))
    return 0


def cmd_lr_find(args) -> int:
    spec = get_spec(args.model)
    vocab, splits = _data(args.data, None, spec.config().block_size, spec.split, 42)
    model = spec.build(spec.config(vocab_size=vocab.size))
    lrs, losses = lr_find(model, splits[0], lo=args.lo, hi=args.hi, steps=args.steps, batch_size=args.batch_size,
                          seed=args.seed)
    if args.json:
        print(json.dumps({"lrs": lrs.tolist(), "losses": losses.tolist()}))
        return 0
    window = max(1, args.steps // 20)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    best = int(np.argmin(smooth)) + window // 2
    for i in np.linspace(0, args.steps - 1, 13).astype(int):
        print(f"lr {lrs[i]:9.5f}  loss {losses[i]:.4f}")
    print(f"lowest smoothed loss at lr ≈ {lrs[best]:.4g}; pick a rate somewhat below it")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own parser: every option after `bench` belongs to the benchmarks
        from benchmarks.__main__ import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    commands = {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "plot": cmd_plot, "diagnose": cmd_diagnose, "ladder": cmd_ladder,
                "lr-find": cmd_lr_find}
    try:
        return commands[args.command](args)
    except (ValueError, TypeError, ImportError) as e:
        print(f"jnnex: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

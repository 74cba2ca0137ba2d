"""The ``jnnex`` command: train, sample, evaluate, diagnose and sweep learning rates from the shell.

    jnnex train --model mlp --data census-first --out runs/mlp
    jnnex sample --from runs/mlp -n 20
    jnnex eval --from runs/mlp --data names.txt

A run directory (:mod:`jnnex.rundir`) holds ``config.json``, ``model.npz``, ``checkpoint.npz``, ``metrics.jsonl`` and
``metrics.json``; every file is written atomically and arrays are loaded with ``allow_pickle=False``. Every model
setting is a flag made from the model config's fields (``jnnex train --help`` lists them with the models they apply
to); a flag that does not apply to the chosen model is an error.

Compiled programs are kept in JAX's persistent compilation cache, so a second run of the same model starts at once:
``$JNNEX_CACHE_DIR`` (default ``~/.cache/jnnex/xla``); ``JNNEX_CACHE_DIR=off`` switches it off.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
import typing
from pathlib import Path

import jax
import numpy as np

from jnnex import __version__, parallel, rundir
from jnnex.data import CORPORA, Splits, Vocab, load_words, make_splits
from jnnex.lm import count_params, evaluate, sample_words
from jnnex.models.registry import REGISTRY, build_for_words, get_spec, has_manual_backward, load_run
from jnnex.train import NonFiniteLossError, TrainConfig, ctrl_c_guard, fit, lr_find

# ----------------------------------------------------------------------------------------------------------------------
# Flags made from config fields


def _parser_of(annotation, name: str):
    """``(type callable, argparse extras)`` for a config field's annotation (``int``, ``float | None``, ``tuple[int,
    ...]``, ``bool``, ``str``)."""
    args = typing.get_args(annotation)
    if annotation is bool or set(args) == {bool, type(None)}:
        return None, {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(annotation) is tuple:
        item = args[0]

        def items(text):
            try:
                return tuple(item(v) for v in text.split(",") if v.strip())
            except ValueError:
                raise argparse.ArgumentTypeError(f"--{name}: expected comma-separated {item.__name__}s, "
                                                 f"got {text!r}") from None

        return items, {"metavar": f"{item.__name__.upper()},..."}
    if type(None) in args:  # X | None: "none" is None, anything else is parsed as X
        inner, extra = _parser_of(next(a for a in args if a is not type(None)), name)
        metavar = extra.get("metavar", getattr(inner, "__name__", "value").upper())
        return (lambda text: None if text.lower() == "none" else inner(text)), {"metavar": f"{metavar}|none"}
    return annotation, {}


def _fields(cls) -> list[tuple[dataclasses.Field, typing.Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _add_field_flags(p, cls, applies_to: dict[str, list[str]] | None = None, skip=()) -> None:
    """One flag per field of ``cls`` (its help from the field's ``setting``); ``applies_to`` names the models."""
    for f, annotation in _fields(cls):
        if f.name in skip:
            continue
        kind, extra = _parser_of(annotation, f.name.replace("_", "-"))
        help_text = f.metadata.get("help", "")
        if applies_to is not None:
            help_text += f" [{', '.join(applies_to[f.name])}]"
        if kind is not None:
            extra["type"] = kind
        if f.metadata.get("choices"):
            extra["choices"] = f.metadata["choices"]
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, help=help_text, **extra)


def _model_fields() -> dict[str, tuple[type, list[str]]]:
    """Every model-config field of the registry (but ``vocab_size``, which the data sets): ``name -> (a config class
    that has it, the models it applies to)``."""
    out: dict[str, tuple[type, list[str]]] = {}
    for model, spec in REGISTRY.items():
        for f in dataclasses.fields(spec.config_cls):
            if f.name != "vocab_size":
                out.setdefault(f.name, (spec.config_cls, []))[1].append(model)
    return out


def _add_model_flags(p) -> None:
    fields = _model_fields()
    classes = dict.fromkeys(cls for cls, _ in fields.values())
    done: set[str] = set()
    for cls in classes:  # each field once, from the first config class that declares it
        _add_field_flags(p, cls, {k: v[1] for k, v in fields.items()},
                         skip={f.name for f in dataclasses.fields(cls)} & done | {"vocab_size"})
        done |= {f.name for f in dataclasses.fields(cls)}


def _model_overrides(args, model: str, base: dict | None = None) -> dict:
    """The model-config flags given on the command line, checked against ``model``'s config."""
    over = dict(base or {})
    config_fields = {f.name for f in dataclasses.fields(get_spec(model).config_cls)}
    for name, (_, models) in _model_fields().items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if name not in config_fields:
            raise ValueError(f"--{name.replace('_', '-')} does not apply to model {model!r} (it applies to "
                             f"{', '.join(models)})")
        over[name] = value
    return over


def _train_config(args, spec, train_over: dict) -> TrainConfig:
    """The model's default training settings, then its preset's, then the flags. ``--steps`` moves the learning-rate
    boundaries with it (the lecture decays at half the run) unless ``--lr-boundaries`` is given too."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    over = {**train_over, **given}
    steps = over.pop("steps", spec.train.steps)
    tcfg = dataclasses.replace(spec.train, **over)
    if "lr_boundaries" not in given:
        tcfg = _with_steps(tcfg, spec.train.steps, steps)
    return dataclasses.replace(tcfg, steps=steps, eval_every=min(tcfg.eval_every, steps))


def _with_steps(tcfg: TrainConfig, default_steps: int, steps: int) -> TrainConfig:
    """``tcfg`` for a run of ``steps`` steps: explicit learning-rate boundaries keep their fraction of the run (the
    default, ``None``, is half of any run already, in the library's ``fit`` as here)."""
    boundaries = None if tcfg.lr_boundaries is None else tuple(b * steps // default_steps for b in tcfg.lr_boundaries)
    return dataclasses.replace(tcfg, steps=steps, eval_every=min(tcfg.eval_every, steps), lr_boundaries=boundaries)


# ----------------------------------------------------------------------------------------------------------------------
# The parser


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(f) for f in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions like 0.8,0.1,0.1, got {text!r}") from None


def _add_data(p, default="census-first"):
    p.add_argument("--data", default=default, metavar="PATH|" + "|".join(CORPORA),
                   help=f"a UTF-8 text file with one word per line, or an embedded corpus (default: {default})")


def _diagnosable() -> list[str]:
    """Models whose diagnostics can be read: those with a hand-written backward."""
    return sorted(name for name in REGISTRY if has_manual_backward(name))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jnnex", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"jnnex {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model and save it to --out",
                       description="Train a model. Unset flags take the model's defaults (or its --preset). Model "
                                   "flags list the models they apply to in [brackets].")
    t.add_argument("--model", choices=sorted(REGISTRY),
                   help="(default mlp) " + "; ".join(f"{k}: {v.summary}" for k, v in REGISTRY.items()))
    t.add_argument("--data", metavar="PATH|" + "|".join(CORPORA),
                   help="a UTF-8 text file with one word per line, or an embedded corpus (default: census-first)")
    presets = "; ".join(f"{k}: {', '.join(v.presets)}" for k, v in REGISTRY.items() if v.presets)
    t.add_argument("--preset", help=f"a named set of settings for the model ({presets})")
    t.add_argument("--out", help="run directory for config, parameters, checkpoint and metrics")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out with the settings of its config.json (a flag that conflicts with "
                        "them is an error); a run stopped before its first checkpoint starts again from step 0")
    t.add_argument("--force", action="store_true", help="start a new run in an --out that holds one (its run files "
                                                        "are deleted first)")
    t.add_argument("--split", type=_fractions, help="word fractions, e.g. 0.8,0.1,0.1 (bigram models: 1 = all words)")
    t.add_argument("--split-seed", type=int, help="seed of the word shuffle before splitting (default 42)")
    t.add_argument("--backward", choices=["autodiff", "manual"],
                   help="gradients from jax.grad (default), or from the model's hand-written backward "
                        f"({', '.join(_diagnosable())})")
    t.add_argument("--json", action="store_true", help="print the final metrics as one JSON object on stdout")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    dp = t.add_argument_group("devices and machines (data parallel: the batch split over devices)")
    dp.add_argument("--devices", type=int, help="train on this many devices (of all processes'), the batch split "
                                                "over them (default: one device; CPU: JAX_NUM_CPU_DEVICES=N first)")
    dp.add_argument("--coordinator", help="host:port of process 0, to join several processes (machines) into one "
                                          "run (default $JAX_COORDINATOR_ADDRESS)")
    dp.add_argument("--num-processes", type=int, help="processes in the run (default $JAX_NUM_PROCESSES)")
    dp.add_argument("--process-id", type=int, help="this process's id, 0 … num-processes - 1 (default $JAX_PROCESS_ID)")
    dp.add_argument("--distributed", action="store_true",
                    help="join the run JAX detects (Slurm, Open MPI, Kubernetes, TPU) when no coordinator is given")
    m = t.add_argument_group("model settings")
    _add_model_flags(m)
    o = t.add_argument_group("training settings")
    _add_field_flags(o, TrainConfig)

    mo = sub.add_parser("moons", help="micrograd's demo: MLP(2, [16, 16, 1]) on two moons, 100 SGD steps")
    mo.add_argument("--engine", choices=["scalar", "tensor", "autodiff"], default="tensor",
                    help="scalar Value engine, tensor hand-written backward, or jax.grad (default tensor)")
    mo.add_argument("--steps", type=int, default=100, help="SGD steps (default 100)")
    mo.add_argument("--seed", type=int, default=0, help="seed of the points and the initial weights (default 0)")
    mo.add_argument("--json", action="store_true", help="print the result as one JSON object")

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

    g = sub.add_parser("plot", help="PNG pictures of a run: loss curve, and the embeddings  [needs jnnex[plot]]")
    g.add_argument("--from", dest="run", required=True, help="run directory written by `jnnex train --out`")
    g.add_argument("--out", help="directory for the PNG files (default: the run directory)")

    d = sub.add_parser("diagnose", help="train briefly with per-layer diagnostics; print them and draw the pictures",
                       description="Activation, gradient and update statistics per layer, computed inside the "
                                   "jitted step: a table at initialisation and at the end, and PNGs with --out. "
                                   "Model flags as for `jnnex train`.")
    d.add_argument("--model", default="deep-mlp", choices=_diagnosable(),
                   help="a model with a hand-written backward (its diagnostics are read from it)")
    _add_data(d)
    d.add_argument("--steps", type=int, default=1000, help="training steps (default 1000)")
    d.add_argument("--seed", type=int, default=0, help="seed of initialisation and minibatches (default 0)")
    d.add_argument("--out", help="directory for activations.png, gradients.png, update_ratio.png [needs jnnex[plot]]")
    _add_model_flags(d.add_argument_group("model settings"))

    r = sub.add_parser("ladder", help="makemore part 3's ladder: original -> softmax fixed -> tanh fixed -> Kaiming "
                                      "-> + BatchNorm, each trained with the same budget")
    _add_data(r)
    r.add_argument("--steps", type=int, default=200_000, help="steps per rung (default 200000, the lecture's)")
    r.add_argument("--seed", type=int, default=0, help="seed of initialisation and minibatches (default 0)")
    r.add_argument("--json", action="store_true", help="print the rows as JSON")

    f = sub.add_parser("lr-find", help="exponential learning-rate sweep (the lecture's 1e-3 … 1)")
    f.add_argument("--model", default="mlp", choices=sorted(k for k, v in REGISTRY.items() if v.fit_fn is None),
                   help="a model trained by gradient steps (default mlp)")
    _add_data(f)
    f.add_argument("--lo", type=float, default=1e-3, help="first learning rate (default 1e-3)")
    f.add_argument("--hi", type=float, default=1.0, help="last learning rate (default 1)")
    f.add_argument("--steps", type=int, default=1000, help="steps of the sweep (default 1000)")
    f.add_argument("--batch-size", type=int, default=32, help="minibatch size (default 32)")
    f.add_argument("--seed", type=int, default=0, help="seed of initialisation and minibatches (default 0)")
    f.add_argument("--json", action="store_true", help="print {lrs, losses} as JSON")
    sub.add_parser("bench", add_help=False,
                   help="the benchmarks: hand-written backwards vs autodiff, training throughput "
                        "(`jnnex bench --help`)")
    return ap


# ----------------------------------------------------------------------------------------------------------------------
# Models and data


def _splits(model, words, vocab: Vocab, fractions, split_seed: int) -> Splits:
    return make_splits(words, model.block_size, fractions, split_seed, vocab, per_position=model.per_position)


def _prepare(name: str, data, model_over: dict, fractions=None, split_seed: int = 42):
    """``(spec, model, splits)`` for registered model ``name`` on ``data``."""
    spec = get_spec(name)
    words = load_words(data)
    vocab = Vocab.from_words(words)
    model = build_for_words(spec, words, vocab, **model_over)
    return spec, model, _splits(model, words, vocab, fractions or spec.split, split_seed)


def _manual(model):
    """The same model trained on its hand-written backward (jax.grad nowhere in the training path)."""
    if model.backward_fn is None:
        raise ValueError(f"--backward manual: model {model.name!r} has no hand-written backward "
                         f"(available for {', '.join(_diagnosable())})")
    return model.with_gradients("manual")


# ----------------------------------------------------------------------------------------------------------------------
# Commands


def cmd_moons(args) -> int:
    """micrograd's demo: 100 points, noise 0.1, MLP(2, [16, 16, 1]), hinge + 1e-4 L2, lr 1.0 - 0.9 k/steps."""
    import jax.numpy as jnp

    from jnnex.micrograd import nn, tensor_mlp

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    X, y, params = tensor_mlp.moons_problem(args.seed)
    t0 = time.perf_counter()
    if args.engine == "scalar":
        model = nn.MLP(2, list(tensor_mlp.MOONS_SIZES[1:]), params=params)
        nn.train_moons(model, X, y, steps=args.steps)
        final_loss, final_acc = nn.moons_loss(model, X, y)
        final_loss = final_loss.data
    else:
        x, yj = jnp.asarray(X, jnp.float32), jnp.asarray(y, jnp.float32)
        trained, _, _ = tensor_mlp.train_moons(params, x, yj, steps=args.steps,
                                               engine="manual" if args.engine == "tensor" else "autodiff")
        final_loss, final_acc = float(tensor_mlp.loss_fn(trained, x, yj)), float(tensor_mlp.accuracy(trained, x, yj))
    seconds = time.perf_counter() - t0
    metrics = {"model": "moons-mlp", "engine": args.engine, "steps": args.steps, "seed": args.seed,
               "loss": float(final_loss), "accuracy": float(final_acc), "seconds": round(seconds, 3)}
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"moons-mlp ({args.engine}): loss {final_loss:.6f}  accuracy {final_acc:.0%}  ({args.steps} steps, "
              f"{seconds:.2f} s)")
    return 0


def _sha256(words: list[str]) -> str:
    return hashlib.sha256("\n".join(words).encode()).hexdigest()


def _resume_settings(args, out: Path):
    """``(spec, model config, train config, meta, words)`` of the run in ``out``, from its ``config.json``: the
    source of truth on resume. A flag given with another value than the run's is an error naming both."""
    cfg = rundir.read_json(out / rundir.CONFIG)
    spec = get_spec(cfg["model"])
    if spec.fit_fn is not None:
        raise ValueError(f"--resume: model {cfg['model']!r} is fitted in closed form; there is nothing to resume")

    def conflict(flag, given, saved):
        if given is not None and given != saved:
            raise ValueError(f"--resume: {flag} {given!r} conflicts with the run's {saved!r} (its config.json); "
                             "drop the flag, or start a new run with another --out")

    conflict("--model", args.model, cfg["model"])
    conflict("--data", args.data, cfg["data"])
    conflict("--split", list(args.split) if args.split else None, cfg["split"])
    conflict("--split-seed", args.split_seed, cfg["split_seed"])
    conflict("--backward", args.backward, cfg.get("backward", "autodiff"))
    if args.preset:
        raise ValueError("--resume: --preset does not apply (the run's settings are in its config.json)")
    for name, saved in (("model_config", cfg["model_config"]), ("train_config", cfg["train_config"])):
        fields = _model_fields() if name == "model_config" else {f.name: None for f in dataclasses.fields(TrainConfig)}
        for field in fields:
            given = getattr(args, field, None)
            if given is not None and field not in saved:
                raise ValueError(f"--{field.replace('_', '-')} does not apply to model {cfg['model']!r}")
            conflict(f"--{field.replace('_', '-')}", json.loads(json.dumps(given)), saved.get(field))
    words = load_words(cfg["data"])
    if "data_sha256" in cfg and _sha256(words) != cfg["data_sha256"]:
        raise ValueError(f"--resume: the data {cfg['data']!r} changed since the run started (sha256 "
                         f"{_sha256(words)[:12]}… now, {cfg['data_sha256'][:12]}… then)")
    meta = {k: v for k, v in cfg.items() if k not in ("model", "model_config", "train_config")}
    return spec, spec.config_cls(**cfg["model_config"]), TrainConfig.from_dict(cfg["train_config"]), meta, words


def cmd_train(args) -> int:
    # Before anything starts JAX's backend: join the other processes, if there are any.
    parallel.initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
    if args.devices is not None and args.devices < 1:
        raise ValueError(f"--devices must be >= 1, got {args.devices}")
    out = rundir.check_run_dir(args.out) if args.out else None
    if out is not None and not args.resume and not parallel.is_writer():
        out = None  # a new run's directory belongs to process 0; the others (maybe on its filesystem) keep out of it
    resume_from = None
    if args.resume and args.force:
        raise ValueError("--resume continues the run in --out and --force starts it over: give one of them")
    if args.resume:
        if out is None or not (out / rundir.CONFIG).is_file():
            raise ValueError(f"--resume: no run in {args.out!r} (expected its config.json)")
        spec, model_cfg, tcfg, meta, words = _resume_settings(args, out)
        vocab = Vocab(meta["vocab"], meta["boundary"])
        model = spec.build(model_cfg)
        fractions, split_seed, backward = tuple(meta["split"]), meta["split_seed"], meta.get("backward", "autodiff")
        resume_from = (out / rundir.CHECKPOINT).is_file()
        if not resume_from:  # stopped before its first checkpoint: the same run again, from step 0
            rundir.clear(out)
    else:
        if out is not None and rundir.holds_run(out):
            if not args.force:
                raise ValueError(f"--out {args.out!r} already holds a run: continue it with `jnnex train --resume "
                                 f"--out {args.out}`, or start it over with --force")
            rundir.clear(out)
        name = args.model or "mlp"
        spec = get_spec(name)
        model_over, train_over = {}, {}
        if args.preset:
            if args.preset not in spec.presets:
                raise ValueError(f"model {name!r} has no preset {args.preset!r}; it has {sorted(spec.presets)}")
            model_over, train_over = (dict(d) for d in spec.presets[args.preset])
        model_over = _model_overrides(args, name, model_over)
        tcfg = _train_config(args, spec, train_over)
        fractions = args.split or spec.split
        split_seed = 42 if args.split_seed is None else args.split_seed
        backward = args.backward or "autodiff"
        data = args.data or "census-first"
        words = load_words(data)
        vocab = Vocab.from_words(words)
        model = build_for_words(spec, words, vocab, **model_over)
        meta = {"data": str(data), "data_sha256": _sha256(words), "vocab": vocab.chars, "boundary": vocab.boundary,
                "split": list(fractions), "split_seed": split_seed, "backward": backward}
    if backward == "manual":
        model = _manual(model)
    splits = _splits(model, words, vocab, fractions, split_seed)
    log = sys.stderr if args.json else sys.stdout
    print(f"jnnex: {model.name} on {meta['data']} ("
          f"{', '.join(f'{n} {int((Y >= 0).sum()):,}' for n, (_, Y) in zip(splits.names, splits.parts))} predicted "
          f"characters, V={vocab.size}), seed {tcfg.seed}", file=log)
    t0 = time.perf_counter()
    last: dict = {}
    if spec.fit_fn is not None:
        params, state = spec.fit_fn(model.cfg, *splits.train)
        steps, interrupted = 0, False
        if out is not None:
            rundir.write_json(out / rundir.CONFIG, rundir.config_record(model.name, model.cfg, tcfg, meta))
            rundir.save_pytree(out / rundir.MODEL, (params, state))
    else:
        try:
            res = fit(model, splits.train, tcfg, dev=splits.dev, out=out, resume=bool(resume_from),
                      progress=not (args.no_progress or args.json) and parallel.is_writer(), meta=meta,
                      devices=args.devices)
        except NonFiniteLossError as e:
            print(f"jnnex: error: {e}", file=sys.stderr)
            return 1
        params, state, steps, interrupted = res.ts.params, res.ts.state, int(res.ts.step), res.interrupted
        if res.evals and res.evals[-1]["step"] == steps:
            last = res.evals[-1]  # fit has just evaluated train and dev at the final step
    if interrupted:
        if out is None:
            print(f"jnnex: interrupted at step {steps} (no --out: nothing saved)", file=sys.stderr)
        elif (out / rundir.CHECKPOINT).is_file():
            print(f"jnnex: interrupted at step {steps}; saved to {out} (continue with: jnnex train --resume --out "
                  f"{out})", file=sys.stderr)
        else:
            print(f"jnnex: interrupted before the first chunk: nothing to save (start it again with: jnnex train "
                  f"--resume --out {out})", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - t0
    metrics = {"model": model.name, "backward": backward, "data": meta["data"], "steps": steps,
               "seed": tcfg.seed, "params": count_params(params), "seconds": round(seconds, 3)}
    for name, (X, Y) in zip(splits.names, splits.parts):
        key = f"{name}_loss"
        metrics[key] = last[key] if key in last else evaluate(model, params, state, X, Y)
    if args.devices is not None:
        metrics["devices"], metrics["processes"] = args.devices, jax.process_count()
    if out is not None and parallel.is_writer():
        rundir.write_json(out / rundir.FINAL_METRICS, metrics)
    if args.json:
        print(json.dumps(metrics))
    else:
        print("  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith("_loss"))
              + f"  ({steps} steps, {seconds:.1f} s)")
    return 0


def cmd_sample(args) -> int:
    run = load_run(args.run)
    for word in sample_words(run.model, run.params, run.state, run.vocab, jax.random.key(args.seed), args.n,
                             max_len=args.max_len, temperature=args.temperature, top_k=args.top_k):
        print(word)
    return 0


def cmd_eval(args) -> int:
    run = load_run(args.run)
    source = args.data or run.config["data"]
    splits = _splits(run.model, load_words(source), run.vocab, tuple(run.config["split"]), run.config["split_seed"])
    metrics = {f"{n}_loss": evaluate(run.model, run.params, run.state, X, Y)
               for n, (X, Y) in zip(splits.names, splits.parts)}
    print(json.dumps({"model": run.model.name, "data": str(source), **metrics}) if args.json
          else "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


def cmd_plot(args) -> int:
    from jnnex import plot

    plot.require()
    run = load_run(args.run)
    out = Path(args.out or args.run)
    written = []
    if (Path(args.run) / rundir.METRICS).is_file():
        written.append(plot.plot_loss(Path(args.run) / rundir.METRICS, out / "loss.png"))
    if run.model.embeddings_fn is not None:
        written.append(plot.plot_embeddings(run.model.embeddings_fn(run.params), run.vocab, out / "embeddings.png"))
    for p in written:
        print(p)
    return 0


def cmd_diagnose(args) -> int:
    import jax.numpy as jnp

    from jnnex import diagnostics, plot

    if args.out:
        plot.require()  # before training, not after it
    overrides = _model_overrides(args, args.model)
    spec, model, splits = _prepare(args.model, args.data, overrides)
    tcfg = dataclasses.replace(_with_steps(spec.train, spec.train.steps, args.steps), eval_every=args.steps,
                               seed=args.seed)
    res = fit(model, splits.train, tcfg, progress=False, eval_train=False, diagnostics=True)
    names = diagnostics.weight_names(res.ts.params)
    print(f"{model.name} {dict(overrides) or ''} on {args.data}: loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f}")
    print(f"\n-- step 0 (initialisation)\n{diagnostics.table(res.metrics, names, 0)}")
    print(f"\n-- step {args.steps - 1}\n{diagnostics.table(res.metrics, names, -1)}")
    if model.name in ("rnn", "gru"):  # backprop through time: how far back the last prediction's gradient reaches
        X = jnp.asarray(splits.train[0][:512])
        y_last = jnp.asarray(splits.train[1][:512, 0])  # any valid character as the last position's target
        for label, p in (("initialisation", model.init(jax.random.key(args.seed))[0]), ("trained", res.ts.params)):
            prof = diagnostics.gradient_through_time(model, p, res.ts.state, X, y_last)
            print(f"\n|dL_last/dh_t| for t = 0..{X.shape[1] - 1} ({label}): "
                  + " ".join(f"{v:.2e}" for v in prof.tolist()))
    if args.out:
        X, Y = (jnp.asarray(a[:512]) for a in splits.train)  # one batch of the training data, in train mode
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
        spec, model, splits = _prepare(name, args.data, overrides)
        tcfg = dataclasses.replace(_with_steps(spec.train, spec.train.steps, args.steps), eval_every=args.steps,
                                   seed=args.seed)
        t0 = time.perf_counter()
        res = fit(model, splits.train, tcfg, dev=splits.dev, progress=False)
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
    _, model, splits = _prepare(args.model, args.data, {})
    lrs, losses = lr_find(model, splits.train, lo=args.lo, hi=args.hi, steps=args.steps, batch_size=args.batch_size,
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


COMMANDS = {"train": cmd_train, "moons": cmd_moons, "sample": cmd_sample, "eval": cmd_eval, "plot": cmd_plot,
            "diagnose": cmd_diagnose, "ladder": cmd_ladder, "lr-find": cmd_lr_find}


def use_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache in ``$JNNEX_CACHE_DIR`` (default ``~/.cache/jnnex/xla``; ``off``,
    ``0`` or an empty value: no cache). Returns the directory used, or ``None``."""
    path = os.environ.get("JNNEX_CACHE_DIR", str(Path.home() / ".cache" / "jnnex" / "xla"))
    if path.strip().lower() in ("", "0", "off", "none"):
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # start-up is many small programs
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    use_compilation_cache()
    if argv[:1] == ["bench"]:  # its own parser: every option after `bench` belongs to the benchmarks
        from jnnex.bench.__main__ import main as bench_main

        return bench_main(argv[1:])
    try:
        with ctrl_c_guard() as ctrl_c:  # from here on, a first Ctrl-C never raises inside JAX: see fit
            args = build_parser().parse_args(argv)
            code = COMMANDS[args.command](args)
    except (ValueError, TypeError, ImportError) as e:
        print(f"jnnex: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C
        print("jnnex: interrupted", file=sys.stderr)
        return 130
    if ctrl_c.pressed and code == 0:  # pressed while a command other than training finished its work
        print("jnnex: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())

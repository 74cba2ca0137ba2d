"""The ``jnnex`` command: train, sample, evaluate, diagnose and sweep learning rates from the shell.

    jnnex train --model mlp --data census-first --out runs/mlp
    jnnex sample --from runs/mlp -n 20
    jnnex eval --from runs/mlp --data names.txt

Each command parses its flags, makes one library call and prints: a run is :mod:`jnnex.run`'s (so ``jnnex train`` and
``jnnex.run.train`` make the same run), its directory's format :mod:`jnnex.rundir`'s. Every model setting is a flag
made from the model config's fields (``jnnex train --help`` lists them with the models they apply to); a flag that
does not apply to the chosen model is an error.

Compiled programs are kept in JAX's persistent compilation cache, so a second run of the same model starts at once:
``$JNNEX_CACHE_DIR`` (default ``~/.cache/jnnex/xla``); ``JNNEX_CACHE_DIR=off`` switches it off.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import types
from pathlib import Path

import jax
import numpy as np

from jnnex import __version__, parallel, rundir, run, text
from jnnex.data import CORPORA, missing_file
from jnnex.layout import SCHEMES, Parallel
from jnnex.lm import continue_text, sample_words
from jnnex.models.registry import REGISTRY, has_manual_backward, splittable
from jnnex.optim import OPTIMIZER_NAMES, TrainConfig
from jnnex.pipeline import parse_schedule
from jnnex.settings import add_flags, given
from jnnex.train import NonFiniteLossError, ctrl_c_guard, fit, initial_params, lr_find

# ----------------------------------------------------------------------------------------------------------------------
# The parser


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(f) for f in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions like 0.8,0.1,0.1, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 32,64,128, got {text!r}") from None
    if any(v < 1 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct positive integers, got {text!r}")
    return values


def _rates(text: str) -> tuple[float, ...]:
    """Comma-separated rates, each a number (``1e-3``), a power of two (``2^-8``) or a range of them (``2^-12:-4``:
    every power of two from 2⁻¹² to 2⁻⁴)."""
    values = []
    for item in text.split(","):
        try:
            if item.startswith("2^") and ":" in item:
                lo, hi = (int(v) for v in item[2:].split(":"))
                if lo > hi:
                    raise argparse.ArgumentTypeError(f"expected the lower exponent first, like 2^-12:-4, got {item!r}")
                values += [2.0**k for k in range(lo, hi + 1)]
            else:
                values.append(2.0 ** int(item[2:]) if item.startswith("2^") else float(item))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated rates like 1e-3,2e-3, 2^-8 or 2^-12:-4, got "
                                             f"{text!r}") from None
    if not all(0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected positive finite rates, got {text!r}")
    return tuple(dict.fromkeys(values))


def _params(text: str) -> tuple[str, ...]:
    values = tuple(dict.fromkeys(text.split(",")))
    if not set(values) <= {"standard", "mup"}:
        raise argparse.ArgumentTypeError(f"expected standard, mup or standard,mup, got {text!r}")
    return values


def schedule_flag(text: str) -> str:
    """``--pipeline-schedule``: a schedule's name, or ``NAME/J`` (a backward in J ticks), as typed."""
    try:
        parse_schedule(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 1f1b, gpipe or alternating, or 1f1b/J or gpipe/J for a backward "
                                         f"in J ticks, got {text!r}") from None
    return text


def _width_steps(text: str) -> dict:
    try:
        width, steps = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTH:STEPS like 192:3000, got {text!r}") from None
    if width < 1 or steps < 1:
        raise argparse.ArgumentTypeError(f"expected a positive width and steps, got {text!r}")
    return {"width": width, "steps": steps}


def _add_data(p, default="census-first"):
    p.add_argument("--data", default=default, metavar="PATH|" + "|".join(CORPORA),
                   help=f"a UTF-8 text file — a word list, one word a line, or a text (the guess: --corpus) — "
                        f"or an embedded corpus (default: {default})")


def _add_model_flags(p) -> None:
    """One flag per model-config field of the registry, each once (from the first config class that declares it)."""
    applies_to = run.model_fields()
    done: set[str] = {"vocab_size"}
    for cls in dict.fromkeys(spec.config_cls for spec in REGISTRY.values()):
        add_flags(p, cls, applies_to, skip=done)
        done |= {f.name for f in dataclasses.fields(cls)}


def _diagnosable() -> list[str]:
    """Models whose diagnostics can be read: those with a hand-written backward."""
    return sorted(name for name in REGISTRY if has_manual_backward(name))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jnnex", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"jnnex {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    diagnosable = _diagnosable()

    t = sub.add_parser("train", help="train a model and save it to --out",
                       description="Train a model. Unset flags take the model's defaults (or its --preset). Model "
                                   "flags list the models they apply to in [brackets].")
    t.add_argument("--model", choices=sorted(REGISTRY),
                   help="(default mlp) " + "; ".join(f"{k}: {v.summary}" for k, v in REGISTRY.items()))
    t.add_argument("--data", metavar="PATH|" + "|".join(CORPORA),
                   help="a UTF-8 file: one word per line, or any text (--corpus); or an embedded corpus (default: "
                        "census-first)")
    t.add_argument("--corpus", choices=text.CORPUS_KINDS,
                   help="read --data as a word list (one example per word) or as one long text (a token stream for "
                        "the per-position models; split 90/10 by position); default: words if no line holds "
                        "whitespace inside it, else text")
    t.add_argument("--tokenizer", choices=text.TOKENIZERS,
                   help="a text's tokens: its characters (default) or byte-level BPE trained on its train part")
    t.add_argument("--vocab-size", type=int, help="--tokenizer bpe: the vocabulary, 256 bytes + merges (default 512)")
    presets = "; ".join(f"{k}: {', '.join(v.presets)}" for k, v in REGISTRY.items() if v.presets)
    t.add_argument("--preset", help=f"a named set of settings for the model ({presets})")
    t.add_argument("--out", help="run directory for config, parameters, checkpoint and metrics")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out with the settings of its config.json (a flag that conflicts with "
                        "them is an error); with --steps above the run's, continue it to that many steps (the "
                        "learning-rate boundaries stay where they were); a run stopped before its first checkpoint "
                        "starts again from step 0")
    t.add_argument("--force", action="store_true", help="start a new run in an --out that holds one (its run files "
                                                        "are deleted first)")
    t.add_argument("--split", type=_fractions, help="word fractions, e.g. 0.8,0.1,0.1 (bigram models: 1 = all words); "
                                                     "a text's: train,val by position (default 0.9,0.1)")
    t.add_argument("--split-seed", type=int, help="seed of the word shuffle before splitting (default 42)")
    t.add_argument("--backward", choices=["autodiff", "manual"],
                   help="gradients from jax.grad (default), or from the model's hand-written backward "
                        f"({', '.join(diagnosable)})")
    t.add_argument("--json", action="store_true", help="print the final metrics as one JSON object on stdout")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    dp = t.add_argument_group("devices and machines (data parallel: the batch split over devices)")
    dp.add_argument("--devices", type=int, help="train on this many devices (of all processes'), the batch split "
                                                "over them (default: one device; CPU: JAX_NUM_CPU_DEVICES=N first)")
    dp.add_argument("--shard-params", action="store_true",
                    help="with --devices: split every parameter and its optimiser state over the devices (ZeRO-3 / "
                         "FSDP), each device keeping 1/N; the same run, and a checkpoint that resumes on any count")
    dp.add_argument("--model-parallel", type=int, metavar="M",
                    help="with --devices N: split every block over M of them (Megatron's tensor parallelism: a data "
                         f"N/M × model M mesh; the models with a split: {', '.join(splittable())})")
    dp.add_argument("--parallel", choices=list(SCHEMES), help="the scheme by name, one of jnnex.layout.SCHEMES' rows "
                                                               f"({', '.join(SCHEMES)}; default: what --devices, "
                                                               "--shard-params and --model-parallel say)")
    dp.add_argument("--stages", type=int, metavar="P",
                    help="with --devices N: cut the blocks into P pipeline stages (a data N/(P·M) × stage P × model M "
                         "mesh, M from --model-parallel or 1; gpt and llama, without dropout)")
    dp.add_argument("--micro-batches", type=int, metavar="K",
                    help="with --stages: each data shard's rows cut into K micro-batches")
    dp.add_argument("--pipeline-schedule", type=schedule_flag, metavar="SCHEDULE",
                    help="with --stages: the pipeline's schedule, 1f1b (default; holds at most P micro-batches' "
                         "activations), gpipe (every forward, then every backward: holds K) or alternating "
                         "(forwards and backwards in turn on every stage: holds 2P - 1, and idles no more than gpipe "
                         "where 1f1b's lockstep ticks wait on the slower of a forward and a backward); gpipe/J or "
                         "1f1b/J: each backward in J ticks of 1/J of a stage's blocks (1f1b/2: 1f1b's memory at "
                         "gpipe's bubble where a backward takes twice a forward)")
    dp.add_argument("--coordinator", help="host:port of process 0, to join several processes (machines) into one "
                                          "run (default $JAX_COORDINATOR_ADDRESS)")
    dp.add_argument("--num-processes", type=int, help="processes in the run (default $JAX_NUM_PROCESSES)")
    dp.add_argument("--process-id", type=int, help="this process's id, 0 … num-processes - 1 (default $JAX_PROCESS_ID)")
    dp.add_argument("--coordinator-timeout", type=float, default=60.0,
                    help="seconds to wait for the coordinator and the other processes (default 60)")
    dp.add_argument("--distributed", action="store_true",
                    help="join the run JAX detects (Slurm, Open MPI, Kubernetes, TPU) when no coordinator is given")
    _add_model_flags(t.add_argument_group("model settings"))
    add_flags(t.add_argument_group("training settings"), TrainConfig)

    mo = sub.add_parser("moons", help="micrograd's demo: MLP(2, [16, 16, 1]) on two moons, 100 SGD steps")
    mo.add_argument("--engine", choices=["scalar", "tensor", "autodiff"], default="tensor",
                    help="scalar Value engine, tensor hand-written backward, or jax.grad (default tensor)")
    mo.add_argument("--steps", type=int, default=100, help="SGD steps (default 100)")
    mo.add_argument("--seed", type=int, default=0, help="seed of the points and the initial weights (default 0)")
    mo.add_argument("--json", action="store_true", help="print the result as one JSON object")

    s = sub.add_parser("sample", help="generate words, or continue a text, from a trained model")
    s.add_argument("--from", dest="run", required=True, help="run directory written by `jnnex train --out`")
    s.add_argument("-n", type=int, help="number of words (default 20); a text run's: tokens to generate (default 500)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    s.add_argument("--temperature", type=float, default=1.0, help="divide the logits by this (default 1)")
    s.add_argument("--top-k", type=int, help="sample only among the k most likely tokens")
    s.add_argument("--top-p", type=float, help="a text run's: sample only among the most likely tokens whose "
                                                "probability reaches this (default 1: all)")
    s.add_argument("--max-len", type=int, help="a word list's: longest word generated (default 32)")
    s.add_argument("--prompt", help="a text run's: the text to continue (default a newline)")
    s.add_argument("--no-cache", action="store_true", help="a text run's: re-run the whole context for every token "
                                                           "instead of the KV cache")

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
    d.add_argument("--model", default="deep-mlp", choices=diagnosable,
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

    f = sub.add_parser("lr-find", help="exponential learning-rate sweep (the lecture's 1e-3 … 1)",
                       description="One run whose learning rate grows exponentially from --lo to --hi; the loss at "
                                   "each step. Model flags as for `jnnex train`.")
    f.add_argument("--model", default="mlp", choices=sorted(k for k, v in REGISTRY.items() if v.fit_fn is None),
                   help="a model trained by gradient steps (default mlp)")
    _add_data(f)
    f.add_argument("--lo", type=float, default=1e-3, help="first learning rate (default 1e-3)")
    f.add_argument("--hi", type=float, default=1.0, help="last learning rate (default 1)")
    f.add_argument("--steps", type=int, default=1000, help="steps of the sweep (default 1000)")
    f.add_argument("--batch-size", type=int, default=32, help="minibatch size (default 32)")
    f.add_argument("--seed", type=int, default=0, help="seed of initialisation and minibatches (default 0)")
    f.add_argument("--json", action="store_true", help="print {lrs, losses} as JSON")
    _add_model_flags(f.add_argument_group("model settings"))
    pl = sub.add_parser("plan", help="memory per device and bytes communicated of training a transformer: data "
                                     "parallel, FSDP, tensor parallel, both, pipeline, experts; XLA's figures "
                                     "beside (--check)")
    pl.add_argument("--model", choices=splittable(), default="gpt", help="the model (default gpt): one with a "
                                                                          "tensor-parallel split")
    pl.add_argument("--preset", default="gpt2-124m", help="its preset's shape (default gpt2-124m)")
    pl.add_argument("--vocab-size", type=int, default=50_304, help="tokens in the vocabulary (default 50,304: GPT-2's "
                                                                  "padded)")
    pl.add_argument("--devices", type=int, default=8, help="devices in all (default 8)")
    pl.add_argument("--parallel", choices=["dp", "fsdp", "tp", "fsdp+tp", "pp", "ep"], action="append",
                    help="one scheme (repeatable; default: every scheme the model trains under — dp, fsdp, tp, "
                         "fsdp+tp and pp; with experts ep too)")
    pl.add_argument("--stages", type=int, help="pipeline stages of pp (default: the most that divide --devices and "
                                               "the blocks)")
    pl.add_argument("--micro-batches", type=int, help="micro-batches of pp (default: --batch-size, a row each)")
    pl.add_argument("--pipeline-schedule", type=schedule_flag, metavar="SCHEDULE",
                    help="the schedule of pp (default 1f1b; gpipe, alternating, or 1f1b/J and gpipe/J for a backward "
                         "in J ticks): what a stage holds and how many ticks send")
    pl.add_argument("--model-parallel", type=int, help="the model axis of tp (default: every device) and fsdp+tp "
                                                      "(default 2)")
    pl.add_argument("--batch-size", type=int, default=1, help="sequences per data shard (default 1)")
    pl.add_argument("--optimizer", choices=OPTIMIZER_NAMES, default="adamw", help="the optimiser whose state is "
                                                                                  "planned, read by shape (default "
                                                                                  "adamw)")
    pl.add_argument("--block", type=int, help="tokens per sequence (default: the model's block size)")
    pl.add_argument("--check", action="store_true",
                    help="also compile each step (shapes only, on CPU devices forced to --devices) and print XLA's "
                         "memory analysis beside the plan")
    pl.add_argument("--json", action="store_true", help="print the rows as JSON")
    sc = sub.add_parser("scale", help="sweeps from toy to large: μP's coordinate check, learning-rate transfer, a "
                                      "scaling law (resumable; JSON, a table and --png pictures in --out)",
                        description="Sweep a transformer over widths (n_embd) and learning rates or step counts. "
                                    "coord: μP's coordinate check (each layer's RMS after a few Adam steps on one "
                                    "batch, against width; --steps, default 5, at --lr, default 3e-3). transfer: "
                                    "validation loss for every width, rate and parametrisation (--params) at the "
                                    "model's training settings; each width's best rate. law: each width trained each "
                                    "of --step-counts (and, with --budgets, for the steps that spend each budget: "
                                    "IsoFLOP profiles), fitted to L(N, D) = E + A/N^α + B/D^β; --predict W:S predicts "
                                    "that run before making it. Every finished run is appended to --out/<sweep>.jsonl "
                                    "and a sweep started again runs only what is missing; every width's memory is "
                                    "estimated before the first run. Model and training flags as for `jnnex train`.")
    sc.add_argument("sweep", choices=["coord", "transfer", "law"], help="which sweep")
    sc.add_argument("--model", choices=["gpt", "llama"], default="gpt", help="the transformer (default gpt)")
    sc.add_argument("--data", metavar="PATH|" + "|".join(CORPORA),
                    help="a word list or a text, or an embedded corpus (default: census-first)")
    sc.add_argument("--corpus", choices=text.CORPUS_KINDS, help="read --data as a word list or as a text (default: "
                                                                 "guessed, as for `jnnex train`)")
    sc.add_argument("--preset", help="the model's named settings (as for `jnnex train`)")
    sc.add_argument("--backward", choices=["autodiff", "manual"], help="jax.grad (default) or the hand-written "
                                                                         "backward")
    sc.add_argument("--out", required=True, help="directory for the runs' rows (<sweep>.jsonl), <sweep>.json, the "
                                                 "table and the picture")
    sc.add_argument("--widths", type=_ints, required=True, help="the widths (n_embd), e.g. 32,64,128,256")
    sc.add_argument("--params", type=_params,
                    help="coord and transfer: the parametrisations, standard and/or mup (default both)")
    sc.add_argument("--lrs", type=_rates, help="transfer: the learning rates, e.g. 1e-3,2e-3 or 2^-12:-4 (the powers "
                                               "of two from 2⁻¹² to 2⁻⁴)")
    sc.add_argument("--step-counts", type=_ints, help="law: the training lengths, e.g. 250,500,1000,2000")
    sc.add_argument("--budgets", type=_rates, metavar="FLOPS,...",
                    help="law: IsoFLOP profiles — for each compute budget (6ND FLOPs, e.g. 1e11,3e11,1e12) every "
                         "width trained for the steps that spend it; each budget's compute-optimal size from the "
                         "minimum of a parabola in log N")
    sc.add_argument("--predict", type=_width_steps, metavar="WIDTH:STEPS",
                    help="law: predict this run's loss from the fit, then make it and compare")
    sc.add_argument("--png", action="store_true", help="also draw <sweep>.png (needs matplotlib)")
    _add_model_flags(sc.add_argument_group("model settings"))
    add_flags(sc.add_argument_group("training settings"), TrainConfig)
    sub.add_parser("bench", add_help=False,
                   help="the benchmarks: hand-written backwards vs autodiff, training throughput "
                        "(`jnnex bench --help`)")
    return ap


# ----------------------------------------------------------------------------------------------------------------------
# Commands


def _check_data(data: str | None) -> None:
    """``--data`` that is neither an embedded corpus nor an existing file: an error naming it (and where a file of
    that name is), before anything starts."""
    if data is not None and data not in CORPORA and not Path(data).exists():
        raise ValueError(f"--data: {missing_file(data, 'a UTF-8 text file, or one of ' + ', '.join(CORPORA))}")


def cmd_train(args) -> int:
    _check_data(args.data)  # refused before joining: a process that stops after joining leaves the others waiting
    # Before anything starts JAX's backend: join the other processes, if there are any.
    parallel.initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed,
                        timeout=args.coordinator_timeout)
    if args.resume and args.force:
        raise ValueError("--resume continues the run in --out and --force starts it over: give one of them")
    settings = given(args, [*run.model_fields(), *run.TRAIN_FIELDS])
    log = (lambda line: print(line, file=sys.stderr if args.json else sys.stdout, flush=True))
    par = Parallel.from_flags(args.devices, args.shard_params, args.model_parallel, args.parallel, args.stages,
                              args.micro_batches, args.pipeline_schedule)
    common = dict(parallel=par, progress=not (args.no_progress or args.json), log=log)
    if args.resume:
        if args.out is None:
            raise ValueError("--resume: give the run directory with --out")
        result = run.resume(args.out, model=args.model, data=args.data, split=args.split, split_seed=args.split_seed,
                            gradients=args.backward, preset=args.preset, corpus=args.corpus,
                            tokenizer=args.tokenizer, vocab_size=args.vocab_size, **settings, **common)
    else:
        rc = run.RunConfig.new(args.model or "mlp", args.data or "census-first", preset=args.preset, split=args.split,
                               split_seed=42 if args.split_seed is None else args.split_seed,
                               gradients=args.backward or "autodiff", corpus=args.corpus, tokenizer=args.tokenizer,
                               vocab_size=args.vocab_size, **settings)
        result = run.train(rc, args.out, force=args.force, **common)
    if result.interrupted:
        name = "interrupted" if result.signal == signal.SIGINT else f"stopped by {signal.Signals(result.signal).name}"
        if args.out is None:
            print(f"jnnex: {name} at step {result.steps} (no --out: nothing saved)", file=sys.stderr)
        elif not parallel.is_writer():
            print(f"jnnex: {name} at step {result.steps} (process {jax.process_index()}; process 0 saves the run)",
                  file=sys.stderr)
        elif result.saved:
            print(f"jnnex: {name} at step {result.steps}; saved to {args.out} (continue with: jnnex train --resume "
                  f"--out {args.out})", file=sys.stderr)
        else:
            print(f"jnnex: {name} before the first chunk: nothing to save (start it again with: jnnex train --resume "
                  f"--out {args.out})", file=sys.stderr)
        return 128 + int(result.signal)
    m = result.metrics
    print(json.dumps(m) if args.json else "  ".join(f"{k} {v:.4f}" for k, v in m.items() if "_loss" in k)
          + f"  ({m['steps']} steps, {m['seconds']:.1f} s)")
    if args.out is None:
        print("jnnex: no --out: the trained model was not saved (give --out DIR to keep it, and sample or evaluate "
              "it later)", file=sys.stderr)
    return 0


# The library's names for the sampling settings, as the flags that set them (its errors name the former).
_SAMPLE_FLAGS = {"n": "-n", "n_new": "-n", "max_len": "--max-len", "temperature": "--temperature", "top_k": "--top-k",
                 "top_p": "--top-p"}


def cmd_sample(args) -> int:
    loaded = run.load(args.run)
    _note_unfinished(loaded, args.run)
    text_run = loaded.config.corpus == "text"
    kind_of = [("--prompt", args.prompt is not None, True), ("--top-p", args.top_p is not None, True),  # (flag,
               ("--no-cache", args.no_cache, True), ("--max-len", args.max_len is not None, False)]  # given, for text)
    for flag_, given, for_text in kind_of:
        if given and for_text != text_run:
            raise ValueError(f"{flag_} applies to a run on a {'text' if for_text else 'word list'}; this run is on "
                             f"a {'text' if text_run else 'word list'} (it "
                             f"{'continues the text' if text_run else 'samples whole words'})")
    try:
        if text_run:
            tok = loaded.vocab
            prompt = "\n" if args.prompt is None else args.prompt
            try:
                ids = tok.encode(prompt) if loaded.config.tokenizer == "char" else tok.encode(prompt, "none")
            except ValueError as e:
                raise ValueError(f"--prompt: {e}") from None
            new = continue_text(loaded.model, loaded.params, loaded.state, ids, 500 if args.n is None else args.n,
                                jax.random.key(args.seed), temperature=args.temperature, top_k=args.top_k,
                                top_p=1.0 if args.top_p is None else args.top_p,
                                cache=not args.no_cache and loaded.model.decode_fn is not None)
            print(prompt + tok.decode(new[0]))
            return 0
        words = sample_words(loaded.model, loaded.params, loaded.state, loaded.vocab, jax.random.key(args.seed),
                             20 if args.n is None else args.n, max_len=32 if args.max_len is None else args.max_len,
                             temperature=args.temperature, top_k=args.top_k)
    except ValueError as e:  # a setting refused: named by its flag
        name, _, rest = str(e).partition(" ")
        if name in _SAMPLE_FLAGS:
            raise ValueError(f"{_SAMPLE_FLAGS[name]} {rest}") from None
        raise
    for word in words:
        print(word)
    return 0


def _note_unfinished(loaded, where) -> None:
    note = loaded.unfinished_note(where)
    if note:
        print(f"jnnex: note: {note}", file=sys.stderr)


def cmd_eval(args) -> int:
    loaded = run.load(args.run)
    _note_unfinished(loaded, args.run)
    rc = loaded.config
    other = args.data is not None and not run.same_data(rc, args.data)
    if other:
        print(f"jnnex: note: evaluated on {args.data}, not the run's data ({rc.data}): its parts below are "
              f"{args.data}'s, split as the run's ({', '.join(f'{f:g}' for f in rc.split)}"
              f"{'' if rc.corpus == 'text' else f', seed {rc.split_seed}'})", file=sys.stderr)
    metrics = run.evaluate_run(loaded, args.data)
    print(json.dumps({"model": loaded.model.name, "data": str(args.data or rc.data), "runs_data": not other,
                      "steps": loaded.steps, **metrics})
          if args.json else ("" if not other else f"on {args.data}: ")
          + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


def cmd_plot(args) -> int:
    from jnnex import plot

    plot.require()
    loaded = run.load(args.run)
    out = Path(args.out or args.run)
    written = []
    if (Path(args.run) / rundir.METRICS).is_file():
        written.append(plot.plot_loss(Path(args.run) / rundir.METRICS, out / "loss.png"))
    if loaded.model.embeddings_fn is not None:
        written.append(plot.plot_embeddings(loaded.model.embeddings_fn(loaded.params), loaded.vocab,
                                            out / "embeddings.png"))
    for p in written:
        print(p)
    return 0


def cmd_diagnose(args) -> int:
    import jax.numpy as jnp

    from jnnex import diagnostics, plot

    if args.out:
        plot.require()  # before training, not after it
    settings = given(args, run.model_fields())
    rc = run.RunConfig.new(args.model, args.data, steps=args.steps, eval_every=args.steps, seed=args.seed, **settings)
    model, splits = run.prepare(rc)
    res = fit(model, splits.train, rc.train, evals={}, diagnostics=True)
    names = diagnostics.weight_names(res.ts.params)
    print(f"{model.name} {settings or ''} on {args.data}: loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f}")
    print(f"\n-- step 0 (initialisation)\n{diagnostics.table(res.metrics, names, 0)}")
    print(f"\n-- step {args.steps - 1}\n{diagnostics.table(res.metrics, names, -1)}")
    if rc.corpus == "text":  # a batch of a text: consecutive windows of its beginning, every position predicted
        T = model.block_size
        rows = text.exact_windows(np.asarray(splits.train.tokens[: 512 * T + 1]), T, stride=T)
    else:
        rows = splits.train
    X = jnp.asarray(rows[0][:512])
    first = jax.eval_shape(lambda: model.forward(res.ts.params, res.ts.state, X, train=False)).acts[:1]
    if model.per_position and first and first[0].shape[:2] == X.shape:  # a state h_t per position t: how far back
        # the last prediction's gradient reaches (the recurrent nets, the GPT's residual stream, the bag of words)
        y_last = jnp.asarray(rows[1][:512, 0])  # any valid character as the last position's target
        for label, p in (("initialisation", initial_params(model, rc.train.seed)[0]), ("trained", res.ts.params)):
            prof = diagnostics.gradient_through_time(model, p, res.ts.state, X, y_last)
            print(f"\n|dL_last/dh_t| for t = 0..{X.shape[1] - 1} ({label}): "
                  + " ".join(f"{v:.2e}" for v in prof.tolist()))
    if args.out:
        X, Y = (jnp.asarray(a[:512]) for a in rows)  # one batch of the training data, in train mode
        acts, act_grads = diagnostics.activation_gradients(model, res.ts.params, res.ts.state, X, Y)
        for p in plot.plot_diagnostics(res.metrics, names, acts, act_grads, args.out):
            print(p)
    return 0


def cmd_ladder(args) -> int:
    rows = run.ladder(args.data, args.steps, args.seed)
    if args.json:
        print(json.dumps(rows))
    for row in [] if args.json else rows:
        print(f"{row['rung']:<14} train {row['train']:.4f}  val {row['val']:.4f}   (lecture {row['lecture_train']:.4f}"
              f" / {row['lecture_val']:.4f})  initial loss {row['initial_loss']:.2f}  {row['seconds']:.0f} s")
    return 0


def cmd_lr_find(args) -> int:
    model, splits = run.prepare(run.RunConfig.new(args.model, args.data, **given(args, run.model_fields())))
    lrs, losses = lr_find(model, splits.train, lo=args.lo, hi=args.hi, steps=args.steps, batch_size=args.batch_size,
                          seed=args.seed)
    if args.json:
        print(json.dumps({"lrs": lrs.tolist(), "losses": losses.tolist()}))
        return 0
    window = max(1, args.steps // 20)
    smooth = np.convolve(np.where(np.isfinite(losses), losses, np.inf), np.ones(window) / window, mode="valid")
    best = int(np.argmin(smooth)) + window // 2  # (a window that met a NaN or an overflow: never the lowest)
    for i in np.linspace(0, args.steps - 1, 13).astype(int):
        print(f"lr {lrs[i]:9.5f}  loss {losses[i]:.4f}")
    print(f"lowest smoothed loss at lr ≈ {lrs[best]:.4g}; pick a rate somewhat below it")
    return 0


def cmd_scale(args) -> int:
    from jnnex import scale

    _check_data(args.data)
    settings = given(args, [*run.model_fields(), *run.TRAIN_FIELDS])
    refused = {"n_embd": "--n-embd: the widths are --widths"}
    if args.sweep in ("coord", "transfer"):
        refused.update(param="--param: a coord or transfer sweep takes --params (default standard,mup)")
    if args.sweep == "transfer":
        refused.update(lr="--lr: a transfer sweep takes its rates from --lrs")
    if args.sweep == "law":
        refused.update(steps="--steps: a law sweep takes its lengths from --step-counts")
    for name, message in refused.items():
        if name in settings:
            raise ValueError(message)
    wrong_sweep = [(flag, value) for flag, value, kinds in [("--lrs", args.lrs, ("transfer",)),
                                                          ("--step-counts", args.step_counts, ("law",)),
                                                          ("--predict", args.predict, ("law",)),
                                                          ("--budgets", args.budgets, ("law",)),
                                                          ("--params", args.params, ("coord", "transfer"))]
                   if value is not None and args.sweep not in kinds]
    if wrong_sweep:
        raise ValueError(f"{wrong_sweep[0][0]} does not apply to a {args.sweep} sweep")
    base_width = settings.pop("base_width", None)
    coord = {}
    if args.sweep == "coord":  # a few steps on one batch, at a rate of its own
        coord = {"coord_steps": settings.pop("steps", 5), "coord_lr": settings.pop("lr", 3e-3)}
    rc = run.RunConfig.new(args.model, args.data or "census-first", preset=args.preset,
                           gradients=args.backward or "autodiff", corpus=args.corpus,
                           **({**settings, "base_width": base_width} if args.sweep == "law" else settings))
    if args.png:
        from jnnex import plot
        plot.require()  # before hours of runs
    out = Path(args.out)
    try:
        done = scale.run_sweep(args.sweep, rc, widths=args.widths, params=args.params or ("standard", "mup"),
                               base_width=None if args.sweep == "law" else base_width, lrs=args.lrs,
                               step_counts=args.step_counts, budgets=args.budgets, predict=args.predict, out=out,
                               log=lambda line: print(line, flush=True), **coord)
    except KeyboardInterrupt:
        print(f"jnnex: scale stopped; the finished runs are kept in {out}: the same command continues the sweep",
              file=sys.stderr)
        return 130
    rundir.write_json(out / f"{args.sweep}.json", {k: v for k, v in done.items() if k != "table"})
    rundir.write_text(out / f"{args.sweep}.md", done["table"] + "\n")
    print(done["table"])
    print(f"\n-> {out / (args.sweep + '.json')}")
    if args.png:
        from jnnex import plot
        print(f"-> {plot.plot_sweep(args.sweep, done['result'], out / (args.sweep + '.png'))}")
    return 0


def cmd_moons(args) -> int:
    from jnnex.micrograd.nn import moons_demo

    m = moons_demo(args.engine, args.steps, args.seed)
    print(json.dumps(m) if args.json else f"moons-mlp ({m['engine']}): loss {m['loss']:.6f}  accuracy "
                                          f"{m['accuracy']:.0%}  ({m['steps']} steps, {m['seconds']:.2f} s)")
    return 0


def cmd_plan(args) -> int:
    from jnnex import plan

    for name in ("devices", "batch_size", "vocab_size", "block", "stages", "micro_batches"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    piped = [flag for flag, value in (("--stages", args.stages), ("--micro-batches", args.micro_batches),
                                      ("--pipeline-schedule", args.pipeline_schedule)) if value is not None]
    if piped and args.parallel is not None and "pp" not in args.parallel:
        raise ValueError(f"{piped[0]} applies to pp, which is not planned here ({', '.join(args.parallel)}): add "
                         f"--parallel pp")
    if args.check and jax.config.jax_platforms in (None, "", "cpu") and "JAX_NUM_CPU_DEVICES" not in os.environ:
        jax.config.update("jax_num_cpu_devices", args.devices)  # (before the backend starts: nothing has run yet)
    over = {"vocab_size": args.vocab_size, **({"block_size": args.block} if args.block else {})}
    model = plan.build_model(args.model, args.preset, **over)
    result = plan.report(model, args.devices, schemes=args.parallel, model_parallel=args.model_parallel,
                         batch=args.batch_size, check=args.check, optimizer=args.optimizer, stages=args.stages,
                         micro_batches=args.micro_batches, schedule=args.pipeline_schedule or "1f1b")
    print(json.dumps({"rows": result["rows"], "family": result["family"]}) if args.json else result["table"])
    return 0


TRAINING = ("train", "diagnose", "ladder", "scale")  # the commands that run a training loop (signals: main)
NO_SIGNAL = types.SimpleNamespace(pressed=0)
COMMANDS = {"train": cmd_train, "moons": cmd_moons, "sample": cmd_sample, "eval": cmd_eval, "plot": cmd_plot,
            "diagnose": cmd_diagnose, "ladder": cmd_ladder, "lr-find": cmd_lr_find, "plan": cmd_plan,
            "scale": cmd_scale}


# ----------------------------------------------------------------------------------------------------------------------
# The process


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
        args = build_parser().parse_args(argv)
        # The commands that train: a first Ctrl-C or SIGTERM never raises inside JAX and stops after the chunk in
        # flight (see fit). The others keep the default signals: SIGTERM ends them at once, Ctrl-C as it would.
        guard = ctrl_c_guard() if args.command in TRAINING else contextlib.nullcontext(NO_SIGNAL)
        with guard as ctrl_c:
            try:
                code = COMMANDS[args.command](args)
            except BaseException as e:  # stopped before training started: the other processes are told why
                parallel.stopped_before_start(e)
                raise
    except (ValueError, TypeError, ImportError) as e:
        print(f"jnnex: error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, OSError) as e:  # a run that went wrong, or a file that could not be written
        print(f"jnnex: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C
        print("jnnex: interrupted", file=sys.stderr)
        return 130
    except jax.errors.JaxRuntimeError as e:  # a collective of several processes that cannot complete
        if jax.process_count() == 1:
            raise  # one process: a bug, with its traceback
        said = str(e).splitlines()[0][:300]
        print(f"jnnex: error: process {jax.process_index()} of {jax.process_count()}: the other processes did not "
              f"join a collective step (one stopped — see its own output — or the network failed); start every "
              f"process again with the same command (--resume continues from the last checkpoint). XLA: {said}",
              file=sys.stderr)
        return 1
    if ctrl_c.pressed and code == 0:  # received while a command other than training finished its work
        print("jnnex: interrupted", file=sys.stderr)
        return 128 + int(ctrl_c.pressed)
    return code


if __name__ == "__main__":
    sys.exit(main())

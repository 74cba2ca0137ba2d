"""A run, in one room: what it is, how it is made, trained, resumed, continued and loaded.

A run is a :class:`RunConfig` — exactly what its ``config.json`` holds: the model and its settings, the training
settings, the data (as given, its absolute path and its sha256), the vocabulary, the split, the gradient source —
and a run directory (:mod:`jnnex.rundir`, the format) that :func:`train` fills::

    rc = RunConfig.new("wavenet", "names.txt", steps=20_000)   # the registry's settings, fitted to 20,000 steps
    result = train(rc, out="runs/w")                            # config.json, metrics, checkpoints, model.npz
    result = resume("runs/w", steps=40_000)                     # the same run continued to 40,000 steps
    loaded = load("runs/w")                                     # model, parameters, state, vocabulary, config

``jnnex train`` is these calls and nothing else (parse, one call, print), so the library and the command line make
the same run, bit for bit.

**Settings compose in one order**: the model's registry entry, then its ``preset``, then the settings given. A
``steps`` given fits the schedule to the run (:meth:`jnnex.optim.TrainConfig.with_steps`: the learning-rate
boundaries keep their fraction of the run, unless ``lr_boundaries`` is given too).

**Continuing** a run for more steps (``resume(out, steps=N)``, ``jnnex train --resume --out DIR --steps N``): the
checkpoint's training goes on to step N. The learning-rate boundaries stay at the steps where they were (the
default, half of the first run, is written out as that step), so the steps already taken keep their schedule and the
added ones run at the rate in force at the old end: a constant-rate run continued from 400 to 800 steps equals an
uninterrupted 800-step run, bit for bit; a run with the default schedule continued from 400 to 800 equals an 800-step
run with ``lr_boundaries=(200,)``. ``config.json`` records it (``continued``: from how many steps to how many).

**Words or text.** A run reads a word list (``corpus="words"``: one example per word, :mod:`jnnex.data`) or one long
text (``corpus="text"``: a token stream, :mod:`jnnex.text`, for the per-position models), guessed from the file when
not given (:func:`jnnex.text.corpus_kind`). A text's tokenizer is ``char`` (its characters) or ``bpe`` (byte-level BPE
trained on the training part, :mod:`jnnex.bpe`, saved beside the run as ``tokenizer.bpe``); a text's block size is
64 unless given; its tokens are kept in token files beside the run; its final metrics hold the exact val loss, nanoGPT's
estimates, and the val loss per byte, which compares runs of different tokenizers.

**One run per directory at a time**: the process that writes a run directory holds its lock (:func:`jnnex.rundir.lock`)
from the first check to the last file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from jnnex import bpe, memory, parallel, rundir, text
from jnnex.data import CORPORA, Splits, Vocab, load_words, make_splits
from jnnex.layout import Parallel
from jnnex.lm import GRADIENTS, LanguageModel, count_params, evaluate
from jnnex.models.registry import REGISTRY, ModelSpec, config_for_words, get_spec, has_manual_backward, splittable
from jnnex.optim import TrainConfig, check_optimizer, make_optimizer
from jnnex.parallel import is_writer
from jnnex.settings import flag, from_json, is_flag
from jnnex.train import FitResult, NonFiniteLossError, ProgressBar, TrainState, fit, init_train_state

# ----------------------------------------------------------------------------------------------------------------------
# What a run is


def model_fields() -> dict[str, list[str]]:
    """Every model-config field of the registry but ``vocab_size`` (which the data sets), with the models it
    applies to."""
    out: dict[str, list[str]] = {}
    for name, spec in REGISTRY.items():
        for f in dataclasses.fields(spec.config_cls):
            if f.name != "vocab_size" and is_flag(f):
                out.setdefault(f.name, []).append(name)
    return out


TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What a run is; :meth:`to_json` is its ``config.json``, :meth:`from_json` reads one back (every field checked).
    Make one with :meth:`new`."""

    model: str  # the registry name
    model_config: Any  # the model's frozen config
    train: TrainConfig | None  # None for a model fitted in closed form (the counting bigram)
    data: str  # as given: an embedded corpus's name, or a file's path as typed
    data_sha256: str  # of the words, "\n"-joined; of a text, its file's bytes
    vocab: Vocab | text.Chars | bpe.Tokenizer  # words: characters + boundary; a text: its tokenizer
    split: tuple[float, ...] = (0.8, 0.1, 0.1)  # word fractions of the parts (train, dev, test); a text's (train, val)
    split_seed: int = 42  # of the word shuffle before splitting
    gradients: str = "autodiff"  # or "manual": the model's hand-written backward
    data_path: str | None = None  # a data file's absolute path (None for an embedded corpus): resume from anywhere
    continued: tuple[tuple[int, int], ...] = ()  # (steps before, steps after) each time the run was continued
    corpus: str = "words"  # or "text": one long text as a token stream
    tokenizer: str = "char"  # a text's: char or bpe

    @property
    def vocab_size(self) -> int:
        return self.vocab.vocab_size

    @classmethod
    def new(cls, model: str = "mlp", data: str = "census-first", *, preset: str | None = None,
            split: tuple[float, ...] | None = None, split_seed: int = 42, gradients: str = "autodiff",
            corpus: str | None = None, tokenizer: str | None = None, vocab_size: int | None = None,
            **settings) -> RunConfig:
        """A new run of registered ``model`` on ``data`` (a corpus name or a file of words, or a text): the
        registry's settings, then the ``preset``'s, then ``settings`` — model-config fields and :class:`TrainConfig`
        fields by name (``n_hidden=300``, ``steps=20_000``, ``optimizer="adamw"``). ``corpus`` (``"words"`` or
        ``"text"``; guessed from the file when ``None``), ``tokenizer`` (a text's: ``"char"``, default, or
        ``"bpe"``) and ``vocab_size`` (a BPE tokenizer's, default 512) say how the data is read.

        >>> rc = RunConfig.new("wavenet", steps=20_000)
        >>> rc.train.lr_boundaries, rc.vocab.size
        ((15000,), 27)
        """
        spec = get_spec(model)
        model_over, train_over = {}, {}
        if preset is not None:
            if preset not in spec.presets:
                raise ValueError(f"model {model!r} has no preset {preset!r}; it has {sorted(spec.presets)}")
            model_over, train_over = (dict(d) for d in spec.presets[preset])
        model_given, train_given = _sort_settings(spec, model, settings)
        corpus_given, corpus = corpus, _corpus(data, corpus)
        if corpus == "text":
            if not spec.per_position:
                per_position = ", ".join(n for n, s in REGISTRY.items() if s.per_position)
                how = "as --corpus text asks" if corpus_given == "text" else "its lines hold spaces"
                raise ValueError(f"model {model!r} reads a window and predicts one character; {data} is read as a "
                                 f"text ({how}), which trains a per-position model: {per_position}")
            path = text.check_text_file(data)
            split = tuple(float(f) for f in (split or (1 - text.VAL_FRACTION, text.VAL_FRACTION)))
            if len(split) != 2 or not 0 < split[1] < 1 or abs(sum(split) - 1) > 1e-9:
                raise ValueError(f"a text splits into two parts by position (train, val), as fractions that sum to 1: "
                                 f"--split 0.9,0.1; got {split}")
            tok = text.make_tokenizer(path, tokenizer or "char", vocab_size, split[1])
            model_config = spec.config(vocab_size=tok.vocab_size,
                                       **{"block_size": TEXT_BLOCK_SIZE, **model_over, **model_given})
            sha, vocab = text.file_sha256(path), tok
        else:
            if tokenizer is not None or vocab_size is not None:
                raise ValueError("--tokenizer and --vocab-size apply to a text (--corpus text); a word list is read "
                                 "as characters")
            words = load_words(data)
            vocab = Vocab.from_words(words)
            model_config = config_for_words(spec, words, vocab, **{**model_over, **model_given})
            sha, split = sha256(words), tuple(float(f) for f in (split or spec.split))
        if gradients not in GRADIENTS:
            raise ValueError(f"gradients must be one of {GRADIENTS}, got {gradients!r}")
        if gradients == "manual" and not has_manual_backward(model):
            raise ValueError(f"gradients 'manual' (--backward manual): model {model!r} has no hand-written backward "
                             f"(available for {', '.join(n for n in REGISTRY if has_manual_backward(n))})")
        tcfg = _train_config(spec, train_over, train_given)
        if tcfg is not None:
            check_optimizer(tcfg, spec.build(model_config))
        return cls(model, model_config, tcfg, str(data), sha, vocab, split,
                   split_seed, gradients, data_file(data), corpus=corpus,
                   tokenizer="char" if corpus == "words" else (tokenizer or "char"))

    def to_json(self) -> dict:
        """The ``config.json`` document."""
        return {"model": self.model, "model_config": dataclasses.asdict(self.model_config),
                "train_config": None if self.train is None else dataclasses.asdict(self.train),
                "data": self.data, "data_path": self.data_path, "data_sha256": self.data_sha256,
                "split": list(self.split), "split_seed": self.split_seed, "backward": self.gradients,
                "continued": [{"from_steps": a, "steps": b} for a, b in self.continued],
                "corpus": self.corpus, "tokenizer": self.tokenizer,
                **({"vocab": self.vocab.chars, "boundary": self.vocab.boundary} if self.corpus == "words" else
                   {"vocab": self.vocab.chars} if self.tokenizer == "char" else
                   {"tokenizer_file": rundir.TOKENIZER, "tokenizer_sha256": text.tokenizer_sha256(self.vocab)})}

    @classmethod
    def from_json(cls, doc, where: str = "config.json", tokenizer: bpe.Tokenizer | None = None) -> RunConfig:
        """A :class:`RunConfig` from its ``config.json`` document (also as written before ``data_path``,
        ``continued`` and ``corpus`` existed); every field checked, each error naming ``where`` and the field. A BPE
        run's ``tokenizer`` is read from its own file (:func:`load_config`)."""
        if not isinstance(doc, dict):
            raise ValueError(f"{where} must hold a JSON object, got {type(doc).__name__}")

        def field(name, kind, default=dataclasses.MISSING):
            if name not in doc:
                if default is dataclasses.MISSING:
                    raise ValueError(f"{where} has no field {name!r} (is it a jnnex run's config.json?)")
                return default
            value = doc[name]
            if not isinstance(value, kind) or isinstance(value, bool):
                what = {dict: "an object", str: "a string", int: "an integer"}.get(kind, "a list")
                raise ValueError(f"{where}: {name} must be {what}, got {value!r}")
            return value

        name = field("model", str)
        if name not in REGISTRY:
            raise ValueError(f"{where}: model {name!r} is not a registered model; jnnex has {sorted(REGISTRY)}")
        spec = get_spec(name)
        model_config = from_json(spec.config_cls, field("model_config", dict), f"{where}: model_config")
        train_doc = doc.get("train_config")
        train = None if spec.fit_fn is not None else from_json(TrainConfig, train_doc, f"{where}: train_config")
        corpus, tokenizer_kind = field("corpus", str, "words"), field("tokenizer", str, "char")
        if corpus not in text.CORPUS_KINDS or tokenizer_kind not in text.TOKENIZERS:
            raise ValueError(f"{where}: corpus must be one of {text.CORPUS_KINDS} and tokenizer one of "
                             f"{text.TOKENIZERS}, got {corpus!r} and {tokenizer_kind!r}")
        try:
            if corpus == "words":
                vocab = Vocab(field("vocab", str), field("boundary", str, "."))
            elif tokenizer_kind == "char":
                vocab = text.Chars(field("vocab", str))
            else:
                if tokenizer is None:
                    raise ValueError(f"its tokenizer ({field('tokenizer_file', str)}) was not given")
                if text.tokenizer_sha256(tokenizer) != field("tokenizer_sha256", str):
                    raise ValueError("its tokenizer file is not the one the run was trained with (sha256 differs)")
                vocab = tokenizer
        except ValueError as e:
            raise ValueError(f"{where}: vocab: {e}") from None
        if model_config.vocab_size != vocab.vocab_size:
            raise ValueError(f"{where}: model_config.vocab_size {model_config.vocab_size} does not match the "
                             f"vocabulary's {vocab.vocab_size} tokens")
        split = field("split", list | tuple)
        if not split or not all(isinstance(f, int | float) and not isinstance(f, bool) and f >= 0 for f in split) \
                or abs(sum(split) - 1) > 1e-9:
            raise ValueError(f"{where}: split must be a list of fractions that sum to 1, got {split!r}")
        split_seed = field("split_seed", int, 42)
        gradients = field("backward", str, "autodiff")
        if gradients not in GRADIENTS:
            raise ValueError(f"{where}: backward must be one of {GRADIENTS}, got {gradients!r}")
        continued = field("continued", list | tuple, [])
        try:
            continued = tuple((int(c["from_steps"]), int(c["steps"])) for c in continued)
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{where}: continued must be a list of {{from_steps, steps}}, got {doc['continued']!r}") \
                from None
        data_path = field("data_path", str, None) if doc.get("data_path") is not None else None
        return cls(name, model_config, train, field("data", str), field("data_sha256", str), vocab,
                   tuple(float(f) for f in split), split_seed, gradients, data_path, continued, corpus, tokenizer_kind)

    def continued_to(self, steps: int) -> RunConfig:
        """This run continued to ``steps`` steps (see the module docstring for what the schedule does)."""
        return dataclasses.replace(self, train=self.train.continued(steps),
                                   continued=(*self.continued, (self.train.steps, steps)))


def _sort_settings(spec: ModelSpec, model: str, settings: dict) -> tuple[dict, dict]:
    """``settings`` split into model-config and training fields; one that fits neither is an error naming it."""
    model_own = {f.name for f in dataclasses.fields(spec.config_cls) if is_flag(f)} - {"vocab_size"}
    model_given, train_given = {}, {}
    for name, value in settings.items():
        if name in model_own:
            model_given[name] = value
        elif name in TRAIN_FIELDS and spec.train is not None:
            train_given[name] = value
        elif name in TRAIN_FIELDS:
            raise ValueError(f"{flag(name)} does not apply to model {model!r}: it is fitted in closed form, with no "
                             "training settings")
        elif name in model_fields():
            raise ValueError(f"{flag(name)} does not apply to model {model!r} (it applies to "
                             f"{', '.join(model_fields()[name])})")
        else:
            raise ValueError(f"unknown setting {name!r}: neither a model setting nor a training setting")
    return model_given, train_given


def _train_config(spec: ModelSpec, preset: dict, given: dict) -> TrainConfig | None:
    """The registry's training settings, then the preset's, then the given ones; a given ``steps`` fits the schedule
    to the run (an ``lr_boundaries`` given with it is taken as it is). A preset is one schedule: the steps it states
    go with the boundaries it states."""
    if spec.train is None:
        return None
    base = dataclasses.replace(spec.train, **preset)
    over = dict(given)
    steps = over.pop("steps", None)
    if steps is None:
        return dataclasses.replace(base, **over)
    if "lr_boundaries" not in given:  # the registry's or the preset's boundaries: fitted to the run
        return dataclasses.replace(base, **over).with_steps(steps)
    boundaries = over.pop("lr_boundaries")
    return dataclasses.replace(dataclasses.replace(base, **over).with_steps(steps), lr_boundaries=boundaries)


def sha256(words: list[str]) -> str:
    return hashlib.sha256("\n".join(words).encode()).hexdigest()


def data_file(data) -> str | None:
    """A data file's absolute path; ``None`` for an embedded corpus."""
    return None if str(data) in CORPORA else str(Path(data).resolve())


TEXT_BLOCK_SIZE = 64  # a text's context when none is given (nanoGPT's CPU recipe)


def _corpus(data, corpus: str | None) -> str:
    """``corpus`` checked, or guessed: an embedded corpus is words; a file, :func:`jnnex.text.corpus_kind`."""
    if corpus is not None and corpus not in text.CORPUS_KINDS:
        raise ValueError(f"corpus must be one of {text.CORPUS_KINDS}, got {corpus!r}")
    if str(data) in CORPORA:
        if corpus == "text":
            raise ValueError(f"--corpus text: {data!r} is an embedded word list; give a text file")
        return "words"
    return corpus or text.corpus_kind(text.check_text_file(data))


# ----------------------------------------------------------------------------------------------------------------------
# What a run is made of


class Prepared(NamedTuple):
    model: LanguageModel  # built once, on the run's gradients
    splits: Splits


def _source(rc: RunConfig) -> str:
    """Where the run's data is read from: its absolute path where it has one, so a run resumes from any directory."""
    return rc.data_path if rc.data_path is not None and Path(rc.data_path).exists() else rc.data


def read_words(rc: RunConfig) -> list[str]:
    """The run's words, checked against the sha256 the run started with."""
    source = _source(rc)
    words = load_words(source)
    if sha256(words) != rc.data_sha256:
        raise ValueError(f"the data {source!r} changed since the run started (sha256 {sha256(words)[:12]}… now, "
                         f"{rc.data_sha256[:12]}… then)")
    return words


def text_splits(rc: RunConfig, source: str | None = None, out: Path | None = None) -> text.TextSplits:
    """A text run's train and val streams: of its own text (checked against its sha256), or of ``source`` split
    alike; kept in token files in ``out`` when given."""
    path = text.check_text_file(_source(rc) if source is None else source)
    sha = text.file_sha256(path)
    if source is None and sha != rc.data_sha256:
        raise ValueError(f"the data {str(path)!r} changed since the run started (sha256 {sha[:12]}… now, "
                         f"{rc.data_sha256[:12]}… then)")
    cut = text.split_point(path, rc.split[1])
    streams = text.token_files(path, rc.vocab, cut, out, sha) if out is not None else \
        text.encode_streams(path, rc.vocab, cut)
    return text.TextSplits(rc.vocab, rc.model_config.block_size, streams)


def prepare(rc: RunConfig, words: list[str] | None = None, out: Path | None = None) -> Prepared:
    """The run's model (built once, on its gradients) and its splits of the data (``words``: the run's, read and
    checked, by default; a text's streams, kept in token files in ``out`` when given)."""
    spec = get_spec(rc.model)
    model = spec.build(rc.model_config)
    if rc.gradients != model.gradients:
        model = model.with_gradients(rc.gradients)
    if rc.corpus == "text":
        return Prepared(model, text_splits(rc, out=out))
    words = read_words(rc) if words is None else words
    return Prepared(model, make_splits(words, model.block_size, rc.split, rc.split_seed, rc.vocab,
                                       per_position=model.per_position))


def check_fits(rc: RunConfig, n_train: int, *, available: int | None = None,
               settings: dict | None = None) -> memory.Estimate:
    """The memory estimate of training ``rc`` (:mod:`jnnex.memory`); a ``ValueError`` with the figure and (about,
    to 1 %) the largest value of the batch size and of each integer model setting in ``settings`` (default: every
    integer setting that differs from the model's default) that fits, others as they are, when it cannot fit."""
    available = memory.available_bytes() if available is None else available
    spec = get_spec(rc.model)

    data_bytes = n_train * text.token_dtype(rc.vocab_size).itemsize if rc.corpus == "text" else None

    def estimate(model_config, tcfg):
        return memory.training_estimate(spec.build(model_config), make_optimizer(tcfg), tcfg.batch_size or n_train,
                                        n_train, data_bytes=data_bytes)

    need = estimate(rc.model_config, rc.train)
    if need.total <= available:
        return need
    if settings is None:
        given, default = dataclasses.asdict(rc.model_config), dataclasses.asdict(spec.config(vocab_size=rc.vocab_size))
        settings = {k: v for k, v in given.items() if k != "vocab_size" and type(v) is int and v != default[k]}
    hints = []
    for name, value in settings.items():
        def need_at(v, name=name):
            try:
                model_config = dataclasses.replace(rc.model_config, **{name: v})
            except ValueError:  # not a valid setting (say, a width the heads do not divide)
                return None
            return estimate(model_config, rc.train).total
        largest = _largest(need_at, value, need.total, available)
        if largest:
            hints.append(f"{name} {largest:,}")
    if rc.train.batch_size is not None and need.activations > 0:  # activations grow with the batch, the rest not
        largest = (available - (need.total - need.activations)) * rc.train.batch_size // need.activations
        if largest >= 1:
            hints.append(f"batch_size {min(largest, rc.train.batch_size - 1):,}")
    shown = ", ".join(f"{k}={v:,}" for k, v in settings.items())
    if spec.per_position and any(h.startswith("block_size") for h in hints):
        hints.append(f"a per-position model's block_size is at least the longest word + 1 "
                     f"({rc.model_config.block_size - 1:,} "
                     "characters here): words longer than the block size that fits would have to go")
    raise ValueError(
        f"model {rc.model!r}{f' with {shown}' if shown else ''} needs about {need.describe()} to train at batch "
        f"{rc.train.batch_size or n_train:,}, but {memory.gib(available)} are available; "
        + (f"about the largest that fit, each with the others as they are: {'; '.join(hints)}" if hints else
           "no smaller batch or setting brings it within reach"))


def _largest(need_at: Callable[[int], int | None], above: int, need_above: int, available: int) -> int:
    """About the largest ``v < above`` with ``need_at(v) <= available`` (to 1 %; 0 if none), given ``need_at(above) =
    need_above > available``; ``need_at`` grows with ``v`` and is ``None`` for a value that is no valid setting (a
    width its heads do not divide: the next value down is tried instead). Each ``need_at`` traces the model, so the
    next value tried is where a power law through the two nearest values tried (``need ∝ vᵖ``: p = 2 for a width, 1
    for a depth) crosses ``available``, aimed 0.5 % low, then a value 1 % above the last that fits to close the
    bracket; a bisection step whenever two steps did not halve it."""
    seen: dict[int, int | None] = {}

    def need(v):  # each value traced once
        if v not in seen:
            seen[v] = need_at(v)
        return seen[v]

    def probe(v):  # (the valid value at or below v, its need); (0, 0) when there is none
        while v > 0 and (n := need(v)) is None:
            v -= 1
        return (v, n) if v > 0 else (0, 0)

    # hi does not fit; lo fits, or is 0, or no valid value lies in (best, lo]; best: the largest found that fits
    (lo, n_lo), (hi, n_hi), best, widths = (0, 0), (above, need_above), 0, [above]
    while hi - lo > max(1, lo // 100):
        if n_hi > n_lo > 0:  # the power law through lo and hi
            p = math.log(n_hi / n_lo) / math.log(hi / lo)
            aim = lo * math.exp(min(math.log(available / n_lo) / p, math.log(hi / lo)))  # (at most hi: a flat law)
        else:  # only hi known: a quadratic law through it (low for a steeper need, high for a flatter one), at
            aim = min(hi * (available / n_hi) ** 0.5, hi / 2)  # most half of hi (as fast as halving when none fits)
        guess = int(aim * 0.995)
        if n_lo and guess <= lo:  # lo is within 0.5 % of the crossing: close the bracket just past 1 % above it
            guess = lo + max(1, lo // 100)
        if (len(widths) >= 3 and widths[-1] > widths[-3] / 2) or not lo < guess < hi:  # too slow, or outside
            guess = (lo + hi) // 2 if lo else hi // 2
        v, n = probe(guess)
        if v > lo and n <= available:
            lo, n_lo, best = v, n, v
        elif v > lo:
            hi, n_hi = v, n
        else:  # no valid value in (lo, guess]: the answer is best or lies above guess
            lo, n_lo = guess, 0
        widths.append(hi - lo)
    return best


# ----------------------------------------------------------------------------------------------------------------------
# The run directory's side of training: fit's hooks, and the checkpoint it resumes from


class RunWriter:
    """A :func:`jnnex.train.fit` hook that keeps a run directory: every chunk's row appended to ``metrics.jsonl``,
    the state checkpointed at every evaluation, at the end of the first chunk ``every`` seconds (of ``clock``) after
    the last checkpoint (``None``: never by time) and, when the loop stops between them (Ctrl-C, SIGTERM), at its
    last completed chunk — all atomically. ``saved`` is the step of the checkpoint on disk."""

    def __init__(self, out: Path, saved: int = 0, every: float | None = None, clock: Callable[[], float] =
                 time.monotonic):
        self.out, self.saved, self.every, self.clock = out, saved, every, clock
        self.last, self.now_due = clock(), False

    def due(self) -> bool:
        """Whether this chunk's end is due a checkpoint by time (``fit`` asks before the chunk hooks, so that every
        process takes part in gathering the state)."""
        self.now_due = self.every is not None and self.clock() - self.last >= self.every
        return self.now_due

    def chunk(self, step: int, row: dict, metrics, here) -> None:
        rundir.append_metrics(self.out, row)
        if "time" in row or self.now_due:  # an evaluation, or time: the state too
            rundir.save_pytree(self.out / rundir.CHECKPOINT, here())
            self.saved, self.last, self.now_due = step, self.clock(), False

    def end(self, step: int, here) -> None:
        if step > self.saved:  # interrupted between evaluations: keep the chunks done since
            rundir.save_pytree(self.out / rundir.CHECKPOINT, here())
            self.saved = step


def load_checkpoint(out: Path, model: LanguageModel, tcfg: TrainConfig) -> TrainState:
    """The training state in ``out``'s checkpoint (read into the shapes of a fresh one: nothing computed to load); a
    clear error when it is past the run's steps."""
    like = jax.eval_shape(lambda k: init_train_state(model, make_optimizer(tcfg, model), k), jax.random.key(0))
    ts = rundir.load_pytree(out / rundir.CHECKPOINT, like)
    if int(ts.step) > tcfg.steps:
        raise ValueError(f"the checkpoint in {str(out)!r} is at step {int(ts.step):,}, past the run's "
                         f"{tcfg.steps:,} steps")
    return ts


# ----------------------------------------------------------------------------------------------------------------------
# The lifecycle


@dataclasses.dataclass
class RunResult:
    """What :func:`train` and :func:`resume` return."""

    config: RunConfig
    model: LanguageModel
    params: Any
    state: Any
    splits: Splits
    steps: int  # the step the run reached
    metrics: dict  # the final metrics (metrics.json); empty if interrupted
    interrupted: bool = False
    signal: int | None = None  # what interrupted it (signal.SIGINT, signal.SIGTERM)
    fit: FitResult | None = None  # the training loop's result (None for a closed-form fit)
    out: Path | None = None

    @property
    def saved(self) -> bool:
        """Whether a checkpoint is on disk to resume from."""
        return self.out is not None and (self.out / rundir.CHECKPOINT).is_file()


@parallel.tells_the_others
def train(rc: RunConfig, out: str | Path | None = None, *, force: bool = False, parallel: Parallel = Parallel(),
          progress: bool = True, log: Callable[[str], None] | None = None, on_chunk=None) -> RunResult:
    """Run ``rc`` into the run directory ``out`` (or nowhere, with ``None``): ``config.json`` first, then
    ``fit`` (its hooks write the metrics and checkpoints), then ``model.npz`` and ``metrics.json`` with every split's
    final loss.

    ``out`` holding a run is an error unless ``force`` (its run files are deleted first; :func:`resume` continues
    it). ``parallel`` (:class:`jnnex.layout.Parallel`): the scheme and its devices — data parallel, FSDP, tensor
    parallel; every process calls this alike and only process 0 writes. ``log`` receives one line about the data
    before training starts; ``on_chunk(step, metrics)`` is called after each chunk.
    """
    out = rundir.check_run_dir(out) if out is not None else None
    write = out is not None and is_writer()  # a new run's directory belongs to process 0
    with rundir.lock(out) if write else contextlib.nullcontext():
        if write:
            rundir.remove_temporaries(out)
            if rundir.holds_run(out):
                if not force:
                    raise ValueError(f"--out {str(out)!r} already holds a run: continue it with `jnnex train --resume "
                                     f"--out {out}` (jnnex.run.resume), or start it over with --force")
                rundir.clear(out)
        return _execute(rc, out if write else None, resume=False, par=parallel, progress=progress, log=log,
                        on_chunk=on_chunk)


@parallel.tells_the_others
def resume(out: str | Path, *, steps: int | None = None, parallel: Parallel = Parallel(), progress: bool = True,
           log: Callable[[str], None] | None = None, on_chunk=None, **given) -> RunResult:
    """Continue the run in ``out`` from its checkpoint, with the settings of its ``config.json`` — ``given``
    settings (``model``, ``data``, ``split``, ``split_seed``, ``gradients``, model and training fields) must agree
    with them. ``steps`` above the run's continues it to that many steps (module docstring). A run stopped before
    its first checkpoint starts again from step 0. ``parallel`` is this call's: a run saved on any number of devices,
    split or not, resumes on any other."""
    out = rundir.check_run_dir(out)
    missing = ValueError(f"--resume: no run in {str(out)!r} (expected its {rundir.CONFIG})")
    if not out.is_dir():  # (before the lock, which would make the directory)
        raise missing
    write = is_writer()
    with rundir.lock(out) if write else contextlib.nullcontext():  # a run in progress there: an error naming it
        if not (out / rundir.CONFIG).is_file():
            raise missing
        rc = load_config(out)
        if rc.train is None:
            raise ValueError(f"--resume: model {rc.model!r} is fitted in closed form; there is nothing to resume")
        _check_agrees(rc, steps, given)
        if steps is not None and steps != rc.train.steps:
            rc = rc.continued_to(steps)
        if write:
            rundir.remove_temporaries(out)
        from_checkpoint = (out / rundir.CHECKPOINT).is_file()
        if write and not from_checkpoint:  # stopped before its first checkpoint: the same run again, from step 0
            rundir.clear(out)
        return _execute(rc, out, resume=from_checkpoint, par=parallel, progress=progress, log=log,
                        on_chunk=on_chunk)


def same_data(rc: RunConfig, data) -> bool:
    """Whether ``data`` names the run's data: the same file by its absolute path (from any directory), or the same
    embedded corpus by name."""
    path = data_file(data)
    return path == rc.data_path if path is not None and rc.data_path is not None else str(data) == rc.data


def _check_agrees(rc: RunConfig, steps: int | None, given: dict) -> None:
    """A ``ValueError`` naming the flag, the value given and the run's, for each given setting that differs."""
    def conflict(name, value, saved, given=None):  # ``given``: whether ``value`` was given (default: not None)
        if (value is not None if given is None else given) and value != saved:
            raise ValueError(f"--resume: {name} {value!r} conflicts with the run's {saved!r} (its config.json); "
                             "drop the flag, or start a new run with another --out")

    if steps is not None and steps < rc.train.steps:
        raise ValueError(f"--resume: --steps {steps} conflicts with the run's {rc.train.steps}: a run is continued to "
                         "more steps, never shortened")
    if given.pop("preset", None) is not None:
        raise ValueError("--resume: --preset does not apply (the run's settings are in its config.json)")
    conflict("--model", given.pop("model", None), rc.model)
    data = given.pop("data", None)
    if data is not None and not same_data(rc, data):
        conflict("--data", str(data), rc.data)
    split = given.pop("split", None)
    conflict("--split", None if split is None else tuple(float(f) for f in split), rc.split)
    conflict("--split-seed", given.pop("split_seed", None), rc.split_seed)
    conflict("--backward", given.pop("gradients", None), rc.gradients)
    conflict("--corpus", given.pop("corpus", None), rc.corpus)
    conflict("--tokenizer", given.pop("tokenizer", None), rc.tokenizer)
    conflict("--vocab-size", given.pop("vocab_size", None), rc.vocab_size)
    model_own = {f.name for f in dataclasses.fields(rc.model_config) if is_flag(f)}
    for name, value in given.items():
        if name in TRAIN_FIELDS:  # (a setting given as none is given: None, compared like any value)
            conflict(flag(name), value, getattr(rc.train, name), given=True)
        elif name in model_own and name != "vocab_size":
            conflict(flag(name), value, getattr(rc.model_config, name), given=True)
        elif name in model_fields():
            raise ValueError(f"{flag(name)} does not apply to model {rc.model!r}")
        else:
            raise ValueError(f"unknown setting {name!r}: neither a model setting nor a training setting")


def _execute(rc: RunConfig, out: Path | None, *, resume: bool, par: Parallel, progress: bool, log,
             on_chunk) -> RunResult:
    """The run itself, once ``out``'s policy is settled: ``out`` is where this process writes (None: nowhere)."""
    write = out is not None and is_writer()
    model, splits = prepare(rc, out=out if write else None)
    is_text = rc.corpus == "text"
    if log is not None:
        if is_text:
            counts = ", ".join(f"{n} {len(s.tokens):,}" for n, s in zip(splits.names, splits.parts)) + " tokens"
        else:
            counts = ", ".join(f"{n} {int((Y >= 0).sum()):,}" for n, (_, Y) in zip(splits.names, splits.parts)) \
                + " predicted characters"
        log(f"jnnex: {model.name} on {rc.data} ({counts}, V={rc.vocab_size})"
            + ("" if rc.train is None else f", seed {rc.train.seed}"))
    t0 = time.perf_counter()
    last: dict = {}
    res = None
    if rc.train is None:  # fitted in closed form
        params, state = get_spec(rc.model).fit_fn(model.cfg, *splits.train)
        steps, interrupted = 0, False
        if write:
            rundir.write_json(out / rundir.CONFIG, rc.to_json())
            rundir.save_pytree(out / rundir.MODEL, (params, state))
    else:
        check_fits(rc, len(splits.train[0]))
        if par.scheme == "tp" and model.split_fn is None:  # (tensor_parallel's own error cannot name the others)
            raise ValueError(f"--model-parallel: model {model.name!r} has no split across devices (its layers are not "
                             f"Megatron's column/row pairs); the models that have one: {', '.join(splittable())}")
        if par.scheme == "fsdp" and log is not None:
            log(f"jnnex: {fsdp_summary(model, parallel.data_mesh(par.devices).size)}")
        if write:  # a new run's settings, or a continued run's new length
            if rc.tokenizer == "bpe":
                rc.vocab.save(out / rundir.TOKENIZER)
            rundir.write_json(out / rundir.CONFIG, rc.to_json())
        start = load_checkpoint(out, model, rc.train) if resume else None
        writer = RunWriter(out, 0 if start is None else int(start.step), rc.train.save_seconds) if write else None
        if writer is not None and start is not None:
            rundir.truncate_metrics(out, writer.saved)  # the rows after the checkpoint will be written again
        bar = ProgressBar(rc.train.steps, writer.saved if writer else 0) if progress and is_writer() else None
        try:
            res = fit(model, splits, rc.train, parallel=par, resume_from=start, hooks=(writer, bar, on_chunk))
        except NonFiniteLossError as e:  # the run directory's word on it: which checkpoint is kept
            if bar is not None:
                bar.end(0, None)
            raise NonFiniteLossError(e.step, e.loss, writer.saved if writer and writer.saved > 0 else None) from None
        params, state, steps, interrupted = res.ts.params, res.ts.state, int(res.ts.step), res.interrupted
        if write and (steps > res.start or not (out / rundir.MODEL).is_file()):  # (killed after its last checkpoint:
            rundir.save_pytree(out / rundir.MODEL, (params, state))              # no step left, the model unwritten)
        if res.evals and res.evals[-1]["step"] == steps:
            last = res.evals[-1]  # fit has just evaluated train and dev at the final step
    result = RunResult(rc, model, params, state, splits, steps, {}, interrupted, res.signal if res else None, res, out)
    if interrupted:
        return result
    metrics = {"model": model.name, "backward": rc.gradients, "data": rc.data, "steps": steps}
    if rc.train is not None:
        metrics["seed"] = rc.train.seed
    metrics.update(params=count_params(params), seconds=round(time.perf_counter() - t0, 3))
    if is_text:
        metrics.update(text_losses(model, params, state, splits, last))
    for name, (X, Y) in [] if is_text else zip(splits.names, splits.parts):
        key = f"{name}_loss"
        metrics[key] = last[key] if key in last else evaluate(model, params, state, X, Y)
    metrics.update(par.record())
    if write:
        rundir.write_json(out / rundir.FINAL_METRICS, metrics)
    result.metrics = metrics
    return result


def per_byte(loss: float, tokenizer, stream: text.Stream) -> float:
    """A loss per token of ``stream``'s predictions as a loss per byte of the text they predict (the total nats over
    the bytes of every token but the first): what compares runs with different tokenizers."""
    tokens = np.asarray(stream.tokens)
    return loss * (len(tokens) - 1) / text.utf8_bytes(tokenizer, tokens[1:])


def text_losses(model, params, state, splits: text.TextSplits, last: dict) -> dict:
    """A text run's final figures: the val loss exact and per byte, and nanoGPT's estimates, labelled (the ones the
    last evaluation made, at this step)."""
    name = splits.names[1]
    out = {k: last[k] for k in ("train_loss_estimate", f"{name}_loss", f"{name}_loss_estimate") if k in last}
    if f"{name}_loss" not in out:
        out[f"{name}_loss"] = evaluate(model, params, state, *text.exact_windows(np.asarray(splits.dev.tokens),
                                                                               model.block_size))
    out[f"{name}_loss_per_byte"] = per_byte(out[f"{name}_loss"], splits.vocab, splits.dev)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def load_config(run: str | Path) -> RunConfig:
    """The :class:`RunConfig` of the run directory ``run``; every field checked, errors naming the file."""
    path = Path(run) / rundir.CONFIG
    doc = rundir.read_json(path)
    tokenizer = None
    if isinstance(doc, dict) and doc.get("tokenizer") == "bpe":
        tokenizer = bpe.load(Path(run) / rundir.TOKENIZER)
    return RunConfig.from_json(doc, str(path), tokenizer)


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A run directory, loaded: its config, the model, its final parameters and state."""

    config: RunConfig
    model: LanguageModel
    params: Any
    state: Any
    steps: int | None = None  # the step its model was saved at (None: fitted in closed form)
    finished: bool = True  # False: stopped before its last step (its model is the one it had then)

    @property
    def vocab(self) -> Vocab | text.Chars | bpe.Tokenizer:
        return self.config.vocab

    def unfinished_note(self, where) -> str | None:
        """A line saying the run stopped before its end, and how to finish it; ``None`` for a finished run."""
        if self.finished:
            return None
        return (f"this run stopped at step {self.steps:,} of {self.config.train.steps:,}: its model is the one it had "
                f"then (finish it with: jnnex train --resume --out {where})")


def load(run: str | Path) -> TrainedRun:
    """The run directory written by :func:`train` (or ``jnnex train --out``): its model with the final parameters."""
    run = Path(run)
    if not (run / rundir.CONFIG).is_file() or not (run / rundir.MODEL).is_file():
        raise ValueError(f"{str(run)!r} is not a finished jnnex run (expected {rundir.CONFIG} and {rundir.MODEL})")
    rc = load_config(run)
    model = get_spec(rc.model).build(rc.model_config)
    params, state = rundir.load_pytree(run / rundir.MODEL, jax.eval_shape(model.init, jax.random.key(0)))
    if rc.train is None:
        return TrainedRun(rc, model, params, state)
    finished = (run / rundir.FINAL_METRICS).is_file()
    rows = rundir.read_metrics(run)
    steps = rc.train.steps if finished else (rows[-1]["step"] if rows else 0)
    return TrainedRun(rc, model, params, state, steps, finished)


def evaluate_run(run: TrainedRun, data: str | None = None) -> dict[str, float]:
    """``{split}_loss`` of a loaded run on each part of ``data`` (default: the run's own, checked), split as the
    run was."""
    rc = run.config
    if rc.corpus == "text":
        splits = text_splits(rc, data)
        out = {}
        for name, stream in zip(splits.names, splits.parts):
            out[f"{name}_loss"] = evaluate(run.model, run.params, run.state,
                                           *text.exact_windows(np.asarray(stream.tokens), rc.model_config.block_size))
            out[f"{name}_loss_per_byte"] = per_byte(out[f"{name}_loss"], rc.vocab, stream)
        return out
    words = None if data is None else load_words(data)
    splits = make_splits(words if words is not None else read_words(rc), run.model.block_size, rc.split,
                         rc.split_seed, rc.vocab, per_position=run.model.per_position)
    return {f"{n}_loss": evaluate(run.model, run.params, run.state, X, Y) for n, (X, Y) in zip(splits.names,
                                                                                                  splits.parts)}


# ----------------------------------------------------------------------------------------------------------------------
# makemore part 3's ladder


def ladder(data: str = "census-first", steps: int = 200_000, seed: int = 0) -> list[dict]:
    """Each rung of :data:`jnnex.models.mlp_lm.LADDER` trained with the same budget; a row per rung, with the
    lecture's figures beside jnnex's."""
    from jnnex.models.mlp_lm import LADDER

    rows = []
    for rung, name, settings, lecture in LADDER:
        rc = RunConfig.new(name, data, steps=steps, eval_every=steps, seed=seed, **settings)
        model, splits = prepare(rc)
        t0 = time.perf_counter()
        res = fit(model, splits, rc.train)
        rows.append({"rung": rung, "model": name, **settings, "train": res.evals[-1]["train_loss"],
                     "val": res.evals[-1]["dev_loss"], "lecture_train": lecture[0], "lecture_val": lecture[1],
                     "initial_loss": float(res.losses[0]), "seconds": round(time.perf_counter() - t0, 1)})
    return rows


def fsdp_summary(model, n: int) -> str:
    """The line ``jnnex train --shard-params`` prints: FSDP over ``n`` devices, and the parameters that stay whole on
    each device because no axis of theirs divides by ``n`` (read from the shapes alone: nothing is allocated)."""
    if n == 1:
        return ("FSDP on one device: nothing to split the parameters over, every tensor whole (the run is the "
                "one-device run); give --devices N >= 2 to split them")
    whole = parallel.unsplit(jax.eval_shape(lambda k: model.init(k)[0], jax.random.key(0)), n)
    return (f"parameters and optimiser state split over {n} devices (FSDP); "
            + (f"whole on each device (no axis divides by {n}): {', '.join(whole)}" if whole else "every tensor split"))

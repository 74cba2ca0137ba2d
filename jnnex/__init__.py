"""jnnex: neural networks from first principles, in pure functional JAX.

The package in four roles, plus the first stage on its own:

* **micrograd** (:mod:`jnnex.micrograd`) — a scalar autograd engine, nets of scalars, the same net as tensors
* **models** (:mod:`jnnex.models`) — the bigram, MLP and BatchNorm language models, each with its one forward (and,
  where written, its backward by hand under it), and the registry behind ``jnnex train --model``
* **kernels** — :mod:`jnnex.layers` (forward/backward pairs) and :mod:`jnnex.init` (Kaiming initialisation)
* **machinery** — :mod:`jnnex.data` (corpora, vocabulary, windows and sequences, splits), :mod:`jnnex.lm` (what a
  language model is; evaluation and sampling), :mod:`jnnex.train` (the jitted step, scan, ``fit``, lr finder),
  :mod:`jnnex.rundir` (the run directory, atomic and pickle-free), :mod:`jnnex.diagnostics`, :mod:`jnnex.plot`,
  :mod:`jnnex.settings`, :mod:`jnnex.cli`
* **verification** — :mod:`jnnex.check` (backwards against ``jax.vjp``), :mod:`jnnex.strategies` (Hypothesis; needs
  the ``test`` extra), :mod:`jnnex.atomic` (makemore part 4's exercise, every intermediate gradient by name)

Benchmarks (hand-written backwards against autodiff) are :mod:`jnnex.bench`: ``jnnex bench``.
"""

__version__ = "0.2.0"

from jnnex.data import Vocab, build_sequences, build_windows, load_words, make_moons, make_splits, split_words
from jnnex.lm import LanguageModel, evaluate, generate, sample_words
from jnnex.models.registry import REGISTRY, build, load_run
from jnnex.train import TrainConfig, TrainState, fit, lr_find, make_run, make_step

__all__ = [
    "REGISTRY", "LanguageModel", "TrainConfig", "TrainState", "Vocab", "build", "build_sequences", "build_windows",
    "evaluate", "fit", "generate", "load_run", "load_words", "lr_find", "make_moons", "make_run", "make_splits",
    "make_step", "sample_words", "split_words",
]

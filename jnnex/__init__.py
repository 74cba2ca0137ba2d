"""jnnex: neural networks from first principles, in pure functional JAX.

The package in four roles, plus the first stage on its own:

* **micrograd** (:mod:`jnnex.micrograd`) — a scalar autograd engine, nets of scalars, the same net as tensors
* **models** (:mod:`jnnex.models`) — the bigram, MLP, BatchNorm MLP, WaveNet, RNN/GRU, bag-of-words and GPT language
  models, each with its one forward (and, where written, its backward by hand under it), and the registry behind
  ``jnnex train --model``
* **kernels** — :mod:`jnnex.layers` (forward/backward pairs), :mod:`jnnex.collectives` (Megatron's ``f``/``g`` and the
  column/row-parallel linears: with no mesh axis, the linear) and :mod:`jnnex.init` (Kaiming initialisation)
* **machinery** — :mod:`jnnex.data` (corpora, vocabulary, windows and sequences, splits), :mod:`jnnex.text` (a text
  as a token stream), :mod:`jnnex.bpe` (the byte-level BPE tokenizer), :mod:`jnnex.lm` (what a
  language model is; evaluation and sampling), :mod:`jnnex.optim` (``TrainConfig``, the schedule, one function per
  optimiser), :mod:`jnnex.train` (the jitted step, scan, ``fit``, lr finder),
  :mod:`jnnex.run` (a run: its config, new / resume / continue / load), :mod:`jnnex.rundir` (the run directory's
  format, atomic and pickle-free), :mod:`jnnex.memory` (what a run will take, before it allocates),
  :mod:`jnnex.parallel`, :mod:`jnnex.tensor_parallel`, :mod:`jnnex.diagnostics`, :mod:`jnnex.plot`,
  :mod:`jnnex.settings`, :mod:`jnnex.cli`
* **verification** — :mod:`jnnex.check` (backwards against ``jax.vjp``), :mod:`jnnex.strategies` (Hypothesis; needs
  the ``test`` extra), :mod:`jnnex.atomic` (makemore part 4's exercise, every intermediate gradient by name)

Benchmarks (hand-written backwards against autodiff) are :mod:`jnnex.bench`: ``jnnex bench``.
"""

__version__ = "0.2.0"

import importlib

# Names are imported on first use (PEP 562), so `import jnnex` is light and the command line can take hold of Ctrl-C
# before JAX loads (see jnnex.launch); `from jnnex import fit` works as usual.
_EXPORTS = {
    "Vocab": "jnnex.data", "build_sequences": "jnnex.data", "build_windows": "jnnex.data", "load_words": "jnnex.data",
    "make_moons": "jnnex.data", "make_splits": "jnnex.data", "split_words": "jnnex.data",
    "LanguageModel": "jnnex.lm", "evaluate": "jnnex.lm", "generate": "jnnex.lm", "sample_words": "jnnex.lm",
    "REGISTRY": "jnnex.models.registry", "build": "jnnex.models.registry",
    "RunConfig": "jnnex.run", "load_run": ("jnnex.run", "load"), "train_run": ("jnnex.run", "train"),
    "resume_run": ("jnnex.run", "resume"),
    "Stream": "jnnex.text", "load_text": "jnnex.text", "continue_text": "jnnex.lm",
    "TrainConfig": "jnnex.optim", "TrainState": "jnnex.train", "fit": "jnnex.train", "lr_find": "jnnex.train",
    "make_run": "jnnex.train", "make_step": "jnnex.train",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module, attr = _EXPORTS[name] if isinstance(_EXPORTS[name], tuple) else (_EXPORTS[name], name)
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jnnex' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])

"""jnnex: neural networks from first principles, in pure functional JAX.

Each stage of the curriculum is one module, readable top to bottom:

* :mod:`jnnex.engine`   — a scalar reverse-mode autograd engine (``Value``)
* :mod:`jnnex.nn`       — neurons, layers and MLPs of ``Value`` nodes; micrograd's moons demo
* :mod:`jnnex.mlp`      — the same MLP on tensors with a hand-written backward
* :mod:`jnnex.data`     — corpora, vocabulary, context windows, splits, two-moons
* :mod:`jnnex.bigram`   — the bigram language model, counted and learned
* :mod:`jnnex.mlp_lm`   — the MLP language model (Bengio et al. 2003), autodiff or hand-written backward
* :mod:`jnnex.bn_mlp`   — deep MLP language models with BatchNorm; calibration and folding
* :mod:`jnnex.layers`   — layers as forward/backward pairs (linear, tanh, embedding, losses, BatchNorm)
* :mod:`jnnex.backprop` — the BatchNorm nets' backward by hand, layer by layer (no autodiff in the path)
* :mod:`jnnex.atomic`   — the same backward one elementary operation at a time, every intermediate gradient by name;
  exercise mode
* :mod:`jnnex.check`    — check any forward/backward pair against ``jax.vjp``; ``custom_vjp`` adapter
* :mod:`jnnex.strategies` — Hypothesis strategies for property-testing backwards (needs the ``test`` extra)
* :mod:`jnnex.diagnostics` — activation, gradient and update statistics computed inside the training step
* :mod:`jnnex.init`     — principled (Kaiming) initialisation
* :mod:`jnnex.lm`       — what every language model is; evaluation and sampling for all of them
* :mod:`jnnex.train`    — the shared jitted training machinery (steps, scan, checkpoints, resume, lr finder)
* :mod:`jnnex.models`   — the registry behind ``jnnex train --model``
* :mod:`jnnex.plot`     — loss curves and embedding pictures (optional ``plot`` extra)
"""

from jnnex.data import Vocab, build_windows, load_words, make_moons, make_splits, split_words
from jnnex.lm import LanguageModel, evaluate, generate, sample_words
from jnnex.models import REGISTRY, build
from jnnex.train import TrainConfig, TrainState, fit, lr_find, make_run, make_step

__version__ = "0.1.0"

__all__ = [
    "REGISTRY", "LanguageModel", "TrainConfig", "TrainState", "Vocab", "build", "build_windows", "evaluate", "fit",
    "generate", "load_words", "lr_find", "make_moons", "make_run", "make_splits", "make_step", "sample_words",
    "split_words",
]

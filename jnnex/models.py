"""The model registry behind ``jnnex train --model NAME``: each language model with its defaults and presets.

A later model joins by adding one :class:`ModelSpec` to :data:`REGISTRY`; the CLI, evaluation, sampling and
benchmarks pick it up from here (a model with a hand-written backward sets ``manual``: ``--backward manual`` and the
manual-vs-autodiff benchmarks then include it).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from jnnex.backprop import bn_mlp_manual
from jnnex.bigram import BigramConfig, counting_bigram, neural_bigram
from jnnex.bn_mlp import BN_MLP_SMALL, BNMLPConfig, bn_mlp
from jnnex.lm import LanguageModel
from jnnex.mlp_lm import MLPConfig, mlp_lm, mlp_lm_manual
from jnnex.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    build: Callable[[Any], LanguageModel]  # config -> model
    config_cls: type  # the model's frozen config dataclass
    train: TrainConfig  # default optimisation settings
    split: tuple[float, ...] = (0.8, 0.1, 0.1)  # default train/dev/test word fractions
    fitted: bool = False  # True: fitted in closed form (counted), not trained by gradient steps
    presets: dict[str, tuple[dict, dict]] = dataclasses.field(default_factory=dict)  # name -> (model, train) overrides
    summary: str = ""
    defaults: dict = dataclasses.field(default_factory=dict)  # config fields that differ from config_cls's defaults
    manual: Callable[[Any], LanguageModel] | None = None  # config -> the model on its hand-written backward

    def config(self, **overrides):
        """The model config: ``config_cls`` defaults, then this entry's ``defaults``, then ``overrides``."""
        return self.config_cls(**{**self.defaults, **overrides})


REGISTRY: dict[str, ModelSpec] = {
    "bigram": ModelSpec(
        counting_bigram, BigramConfig, TrainConfig(steps=1), split=(1.0,), fitted=True,
        summary="counting bigram: smoothed bigram counts, normalised (makemore part 1)",
    ),
    "neural-bigram": ModelSpec(
        neural_bigram, BigramConfig,
        # Full-batch gradient descent as in the lecture (lr 50); 500 steps reach the counting model's loss.
        TrainConfig(steps=500, batch_size=None, lr=50.0, lr_boundaries=(), eval_every=100, chunk=100),
        split=(1.0,),
        summary="neural bigram: logits = onehot(x) @ W, trained by gradient descent (makemore part 1)",
    ),
    "mlp": ModelSpec(
        mlp_lm, MLPConfig, TrainConfig(), manual=mlp_lm_manual,
        presets={
            # makemore part 2 exactly: N(0, 1) init, 200k steps, batch 32, lr 0.1 -> 0.01 at 100k.
            "lecture": ({"init": "lecture"}, {}),
            # Beats the lecture without BatchNorm in the same 200k steps (names.txt dev 2.046 vs 2.170): a longer
            # context, wider embeddings and hidden layer, Kaiming init, batch 64 for less gradient noise.
            "improved": ({"block_size": 4, "n_embd": 16, "n_hidden": 300, "init": "kaiming"}, {"batch_size": 64}),
        },
        summary="MLP language model over a window of characters (Bengio et al. 2003; makemore part 2)",
    ),
    "bn-mlp": ModelSpec(
        functools.partial(bn_mlp, name="bn-mlp"), BNMLPConfig, TrainConfig(), defaults=BN_MLP_SMALL,
        manual=functools.partial(bn_mlp_manual, name="bn-mlp"),
        summary="one hidden layer (200) with BatchNorm, as in makemore parts 3-4",
    ),
    "deep-mlp": ModelSpec(
        bn_mlp, BNMLPConfig, TrainConfig(), manual=bn_mlp_manual,
        summary="5 hidden layers of 100, Linear -> BatchNorm -> tanh, final BatchNorm (makemore part 3)",
    ),
}


def get_spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(REGISTRY)}")
    return REGISTRY[name]


def build(name: str, **config) -> LanguageModel:
    """``build("mlp", vocab_size=27, n_hidden=300)``: a registered model from config fields."""
    spec = get_spec(name)
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    unknown = set(config) - fields
    if unknown:
        raise ValueError(f"model {name!r} has no config field(s) {sorted(unknown)}; it has {sorted(fields)}")
    return spec.build(spec.config(**config))

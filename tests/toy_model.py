"""A toy per-position model, as a user would add one: this module plus one registry entry (see test_models.py).

makemore's ``Bigram``: every position of a padded word predicts the next character from the current one,
``logits (B, T, V) = W[x]``, with its backward by hand under the forward.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jnnex.lm import Forward, LanguageModel
from jnnex.settings import positive_int, setting


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    vocab_size: int = setting(27, "V: tokens in the vocabulary (set from the data)")
    block_size: int = setting(16, "T: the longest word + 1 (set from the data)")
    scale: float = setting(0.0, "std of W at init (0: uniform predictions)")

    def __post_init__(self):
        positive_int("vocab_size", self.vocab_size)
        positive_int("block_size", self.block_size)


class ToyParams(NamedTuple):
    W: jax.Array  # (V, V)


def init(key, cfg: ToyConfig):
    return ToyParams(cfg.scale * jax.random.normal(key, (cfg.vocab_size, cfg.vocab_size), jnp.float32)), ()


def forward(cfg: ToyConfig, params: ToyParams, state, x, train: bool, key=None) -> Forward:
    del key  # no random layer: one signature for every model's forward
    del train
    if x.ndim != 2 or x.shape[1] > cfg.block_size:
        raise ValueError(f"toy: x must have shape (B, T <= {cfg.block_size}), got {x.shape}")
    return Forward(params.W[x], state, x, ())  # (B, T, V)


def backward(cfg: ToyConfig, params: ToyParams, x, dlogits):
    """``dW[v] = Σ dlogits at the positions where x = v`` (a scatter-add)."""
    del cfg
    V = params.W.shape[0]
    return ToyParams(jnp.zeros_like(params.W).at[x.reshape(-1)].add(dlogits.reshape(-1, V))), ()


def toy(cfg: ToyConfig = ToyConfig()) -> LanguageModel:
    return LanguageModel("toy", cfg, init, forward, backward, per_position=True)

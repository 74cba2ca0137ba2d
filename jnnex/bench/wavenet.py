"""The WaveNet's two forms, trained side by side on the same characters: the tree (one 8-character window per
prediction) against the causal dilated convolution (every position of a padded word at once).

For a batch of ``W`` words the convolution predicts their ``Σ (len + 1)`` characters (plus the padded tail, whose
targets are ignored); the tree gets a batch of that many windows, so both steps learn from the same number of
predicted characters. Reported: µs per training step and predicted characters per second, on ``jax.grad`` and on the
hand-written backward, timed in the same rounds; ``conv_speedup`` is the tree's time over the convolution's.

Why the convolution can win: the tree computes 4 + 2 + 1 = 7 nodes per prediction, the convolution shares them,
about 1 + 1 + 1 = 3 per position (plus the 7 start positions of each word); why it can lose: it also computes the
positions after each word's end, which the longest word sets for every word of the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jnnex.bench.harness import interleaved, table
from jnnex.data import Vocab, load_words, make_splits
from jnnex.models.registry import REGISTRY, build_for_words
from jnnex.optim import TrainConfig, make_optimizer
from jnnex.train import init_train_state, make_run, make_step


def _contender(model, X, Y, batch, n_steps):
    opt = make_optimizer(TrainConfig())
    run_fn = make_run(make_step(model, opt), batch)
    ts = init_train_state(model, opt, jax.random.key(0))
    X, Y = jnp.asarray(X), jnp.asarray(Y)
    jax.block_until_ready(run_fn(ts, X, Y, jax.random.key(1), n_steps=n_steps))  # compile and warm
    return lambda: jax.block_until_ready(run_fn(ts, X, Y, jax.random.key(1), n_steps=n_steps))


def run(quick: bool = False) -> dict:
    word_batches = (32,) if quick else (32, 256)
    repeats = 1 if quick else 7
    words = load_words("census-first")
    vocab = Vocab.from_words(words)
    tree = build_for_words(REGISTRY["wavenet"], words, vocab)
    conv = build_for_words(REGISTRY["wavenet-conv"], words, vocab)
    tree_data = make_splits(words, tree.block_size, vocab=vocab).train
    conv_data = make_splits(words, conv.block_size, vocab=vocab, per_position=True).train
    per_word = float((conv_data[1] >= 0).sum() / len(conv_data[1]))  # predicted characters per word, len + 1
    rows = []
    for W in word_batches:
        chars = round(W * per_word)
        n_steps = 5 if quick else max(5, 20_000 // chars)
        contenders = {}
        for grads in ("jax.grad", "manual"):
            g = "manual" if grads == "manual" else "autodiff"
            contenders[("tree", grads)] = _contender(tree.with_gradients(g), *tree_data, chars, n_steps)
            contenders[("conv", grads)] = _contender(conv.with_gradients(g), *conv_data, W, n_steps)
        timings = interleaved(contenders, repeats)
        for (form, grads), t in timings.items():
            per_step = t["median"] / n_steps
            tree_step = timings[("tree", grads)]["median"] / n_steps
            rows.append({"form": form, "gradients": grads, "batch": f"{W} words" if form == "conv" else
                         f"{chars} windows", "predicted_chars": chars,
                         "positions": W * conv.block_size if form == "conv" else chars,
                         "us_per_step": 1e6 * per_step, "spread": t["spread"], "chars_per_s": chars / per_step,
                         "conv_speedup": tree_step / per_step if form == "conv" else None})
    cols = ["form", "gradients", "batch", "predicted_chars", "positions", "us_per_step", "spread", "chars_per_s",
            "conv_speedup"]
    text = (f"census-first: {per_word:.2f} predicted characters per word, words padded to {conv.block_size} "
            f"positions\n\n" + table(rows, cols))
    return {"name": "wavenet", "rows": rows, "table": text,
            "settings": {"word_batches": list(word_batches), "repeats": repeats, "data": "census-first",
                         "chars_per_word": per_word, "padded_length": conv.block_size}}

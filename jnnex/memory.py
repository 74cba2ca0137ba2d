"""How much memory a run will take, known before anything is allocated: a setting that cannot fit stops with the
figure instead of hanging in the allocator or ending in XLA's ``RESOURCE_EXHAUSTED``.

The estimate is read off shapes alone (``jax.eval_shape``: no array is made, a model of a trillion parameters costs
a few milliseconds to estimate):

* **parameters** and the model state, their **gradients**, and the **optimiser state** (Adam keeps two moments);
* **one step's activations**: what the train-mode forward keeps for the backward (the model's ``caches``, which its
  hand-written backward reads and autodiff keeps in some form too), and the logits with their softmax;
* the **training data** on the device.

It is a floor, not XLA's exact figure (XLA may keep more temporaries, or fuse some away); what it is for is the
settings that are off by a factor — a width of a million, a block size of ten thousand. ``$JNNEX_MEMORY_LIMIT``
(bytes, or with a suffix: ``8G``, ``512M``) caps what counts as available, for a machine shared with other work
(and tests).
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

GiB = 2**30


def nbytes(tree) -> int:
    """Bytes of every array (or ``ShapeDtypeStruct``) leaf of ``tree``, a PRNG key's (its key data) included."""
    return int(sum(np.prod(leaf.shape, dtype=np.float64) * leaf.dtype.itemsize
                   for leaf in jax.tree.leaves(tree) if hasattr(leaf, "shape") and hasattr(leaf, "dtype")))


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)i?[bB]?\s*", text)
    if not m:
        raise ValueError(f"JNNEX_MEMORY_LIMIT must be a size like 8G, 512M or 1000000, got {text!r}")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def available_bytes(device=None) -> int:
    """Memory a run may use on ``device`` (default: the first): a GPU's free allocator memory, the host's
    ``MemAvailable`` on CPU; at most ``$JNNEX_MEMORY_LIMIT`` where that is set."""
    device = device or jax.devices()[0]
    free = None
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    if free is None:
        try:
            with open("/proc/meminfo") as f:
                free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError):
            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = os.environ.get("JNNEX_MEMORY_LIMIT")
    return min(free, _parse_size(limit)) if limit else free


class Estimate(NamedTuple):
    """Bytes a training run holds at once, by what holds them."""

    params: int  # parameters and model state
    gradients: int
    optimizer: int  # the optimiser's state
    activations: int  # one step's: the forward's caches, the logits and their softmax
    data: int  # the training set on the device

    @property
    def total(self) -> int:
        return sum(self)

    def describe(self) -> str:
        parts = [("parameters", self.params), ("gradients", self.gradients), ("optimiser state", self.optimizer),
                 ("one step's activations", self.activations), ("training data", self.data)]
        return f"{gib(self.total)} ({', '.join(f'{name} {gib(b)}' for name, b in parts)})"


def gib(n: int) -> str:
    return f"{n / GiB:,.2f} GiB" if n < 1000 * GiB else f"{n / GiB:,.0f} GiB"


def training_estimate(model, optimizer, batch_size: int, n_train: int, *, data_bytes: int | None = None) -> Estimate:
    """The memory of training ``model`` with ``optimizer`` at ``batch_size`` rows a step on ``n_train`` examples
    (``data_bytes``: what the training data takes instead, a text's token stream)."""
    key = jax.random.key(0)
    params, state = jax.eval_shape(model.init, key)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes integer counts and floats (see jnnex.train)
        opt_state = jax.eval_shape(optimizer.init, params)
    activations = _per_batch(model, params, state, batch_size, train=True)
    data = n_train * model.block_size * 4 * 2 if data_bytes is None else data_bytes  # X, Y int32 ((N, T) per position)
    return Estimate(nbytes(params) + nbytes(state), nbytes(params), nbytes(opt_state), activations, data)


def _per_batch(model, params, state, batch: int, *, train: bool) -> int:
    """Bytes of what one forward over ``batch`` rows makes and keeps: its caches, activations and logits (counted
    three times: the logits, their softmax, their gradient or top-k copy). Caches also hold references to weights,
    which cost nothing more; what a row costs is the difference between the forwards over 3 rows and over 2 (2 at
    least: a train-mode BatchNorm needs two rows to have a variance)."""
    key = jax.random.key(0)

    def made(rows):
        x = jax.ShapeDtypeStruct((rows, model.block_size), jnp.int32)
        out = jax.eval_shape(lambda p, s, x, k: model.forward(p, s, x, train=train, key=k), params, state, x, key)
        return nbytes(out.caches) + nbytes(out.acts) + 3 * nbytes(out.logits)

    return batch * (made(3) - made(2))


def sampling_bytes(model, n: int) -> tuple[int, int]:
    """The memory of sampling ``n`` sequences at once, ``(total, per_row)``: the parameters, and one eval-mode
    forward over ``n`` contexts (its logits three times: scaled, filtered for top-k, drawn from)."""
    params, state = jax.eval_shape(model.init, jax.random.key(0))
    per_row = _per_batch(model, params, state, 1, train=False)
    return nbytes(params) + nbytes(state) + n * per_row, per_row


def check_sampling_fits(model, n: int, *, available: int | None = None) -> None:
    """A ``ValueError`` with the figure and the largest ``n`` that fits, when sampling ``n`` sequences at once
    cannot fit in memory."""
    available = available_bytes() if available is None else available
    need, per_row = sampling_bytes(model, n)
    if need <= available:
        return
    largest = max(0, (available - (need - n * per_row)) // max(per_row, 1))
    raise ValueError(f"n = {n:,} sequences at once need about {gib(need)} for model {model.name!r}, but "
                     f"{gib(available)} are available; the largest n that fits is about {largest:,} (sample in "
                     "several calls for more)")

"""Solutions to lesson 5's exercises (read them after trying).

Exercise 1 is every gradient of the BatchNorm MLP, as ``{name: fn(f, g)}`` over the forward's values ``f`` and the
gradients computed before it ``g``. Exercises 2 and 3 are the cross-entropy's and BatchNorm's backward, each in one
expression.

``SLIP`` plants four mistakes, one of each kind a learner makes. The grader must name each of them, and only them:
the suite runs the lesson with ``JNNEX_LESSON_ANSWERS=slip``. The four are:

- a wrong value: ``dbnvar`` without its ``-1/2``;
- a wrong shape: ``dbnvar_inv`` summed without ``keepdims``, so ``(64,)`` where ``(1, 64)`` is wanted;
- Bessel's ``n - 1`` from the lecture's PyTorch code, where jnnex's BatchNorm divides by ``n``: in ``dbndiff2``, and in
  exercise 3.
"""

import jax
import jax.numpy as jnp


def _onehot(f):
    return jax.nn.one_hot(f.y, f.logits.shape[1], dtype=f.logits.dtype)


SOLUTIONS = {
    # Exercise 1, in the order the backward computes them.
    # The loss is -mean_i logprobs[i, y_i]: only the picked entries matter, each with -1/n.
    "dlogprobs": lambda f, g: -_onehot(f) / f.y.shape[0],
    # d log p = dp / p.
    "dprobs": lambda f, g: g.dlogprobs / f.probs,
    # probs = counts * counts_sum_inv: counts_sum_inv (B, 1) was broadcast across the row, so its gradient sums it.
    "dcounts_sum_inv": lambda f, g: (f.counts * g.dprobs).sum(1, keepdims=True),
    # d(1/s) = -1/s² ds.
    "dcounts_sum": lambda f, g: -f.counts_sum**-2 * g.dcounts_sum_inv,
    # counts feeds probs directly, and counts_sum (a sum: the gradient is copied back to every element of the row).
    "dcounts": lambda f, g: f.counts_sum_inv * g.dprobs + g.dcounts_sum,
    # d exp(u) = exp(u) du.
    "dnorm_logits": lambda f, g: f.counts * g.dcounts,
    # norm_logits = logits - logit_maxes: the max is broadcast across the row.
    "dlogit_maxes": lambda f, g: -g.dnorm_logits.sum(1, keepdims=True),
    # logits feed norm_logits directly, and the row's max: the gradient goes to the argmax (none of these rows ties).
    "dlogits": lambda f, g: g.dnorm_logits + (f.logits == f.logit_maxes).astype(f.logits.dtype) * g.dlogit_maxes,
    # logits = h @ W2 + b2.
    "dh": lambda f, g: g.dlogits @ f.W2.T,
    "dW2": lambda f, g: f.h.T @ g.dlogits,
    "db2": lambda f, g: g.dlogits.sum(0),
    # d tanh(u) = (1 - tanh(u)²) du.
    "dhpreact": lambda f, g: (1.0 - f.h**2) * g.dh,
    # hpreact = bngain * bnraw + bnbias.
    "dbngain": lambda f, g: (f.bnraw * g.dhpreact).sum(0),
    "dbnbias": lambda f, g: g.dhpreact.sum(0),
    "dbnraw": lambda f, g: f.bngain.reshape(1, -1) * g.dhpreact,  # (H,) as a row (1, H)
    # bnraw = bndiff * bnvar_inv: bnvar_inv (1, H) was broadcast over the rows, so its gradient sums them.
    "dbnvar_inv": lambda f, g: (f.bndiff * g.dbnraw).sum(0, keepdims=True),
    # bnvar_inv = (bnvar + eps) ** -1/2.
    "dbnvar": lambda f, g: -0.5 * (f.bnvar + f.eps) ** -1.5 * g.dbnvar_inv,
    # bnvar = sum(bndiff2) / n: every element gets 1/n of it (n, not the lecture's n - 1).
    "dbndiff2": lambda f, g: jnp.ones_like(f.bndiff2) / f.x.shape[0] * g.dbnvar,
    # bndiff feeds bnraw directly, and bndiff2 (d u² = 2u du).
    "dbndiff": lambda f, g: f.bnvar_inv * g.dbnraw + 2 * f.bndiff * g.dbndiff2,
    # bndiff = hprebn - bnmeani: the mean is broadcast over the rows.
    "dbnmeani": lambda f, g: -g.dbndiff.sum(0, keepdims=True),
    # hprebn feeds bndiff directly, and the mean (shared equally by the n rows).
    "dhprebn": lambda f, g: g.dbndiff + g.dbnmeani / f.x.shape[0],
    # hprebn = embcat @ W1 + b1.
    "dembcat": lambda f, g: g.dhprebn @ f.W1.T,
    "dW1": lambda f, g: f.embcat.T @ g.dhprebn,
    "db1": lambda f, g: g.dhprebn.sum(0),
    # The concatenation is a reshape, undone.
    "demb": lambda f, g: g.dembcat.reshape(f.emb.shape),
    # The embedding gather: a scatter-add back into the table (a repeated character accumulates).
    "dC": lambda f, g: jnp.zeros_like(f.C).at[f.x.reshape(-1)].add(g.demb.reshape(-1, f.C.shape[1])),
    # Exercise 2: the cross-entropy's backward in one expression. It is softmax minus the one-hot target, over n.
    "ex2_dlogits": lambda f, g: (jax.nn.softmax(f.logits, axis=1) - _onehot(f)) / f.y.shape[0],
    # Exercise 3: BatchNorm's backward in one expression (divide by n: jnnex's variance is the biased one).
    "ex3_dhprebn": lambda f, g: f.bngain.reshape(1, -1) * f.bnvar_inv / f.x.shape[0] * (
        f.x.shape[0] * g.dhpreact - g.dhpreact.sum(0, keepdims=True)
        - f.bnraw * (g.dhpreact * f.bnraw).sum(0, keepdims=True)),
}

_n = lambda f: f.x.shape[0]  # noqa: E731

SLIP = {
    # A wrong value: the -1/2 forgotten.
    "dbnvar": lambda f, g: (f.bnvar + f.eps) ** -1.5 * g.dbnvar_inv,
    # A wrong shape: the sum over the rows without keepdims, so (H,) where (1, H) is wanted.
    "dbnvar_inv": lambda f, g: (f.bndiff * g.dbnraw).sum(0),
    # Bessel's n - 1, from the lecture's PyTorch forward.
    "dbndiff2": lambda f, g: jnp.ones_like(f.bndiff2) / (_n(f) - 1) * g.dbnvar,
    # The lecture's exercise 3 formula as it stands, with its n / (n - 1).
    "ex3_dhprebn": lambda f, g: f.bngain.reshape(1, -1) * f.bnvar_inv / _n(f) * (
        _n(f) * g.dhpreact - g.dhpreact.sum(0, keepdims=True)
        - _n(f) / (_n(f) - 1) * f.bnraw * (g.dhpreact * f.bnraw).sum(0, keepdims=True)),
}

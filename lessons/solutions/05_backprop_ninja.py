"""Solutions to lesson 5's exercise (read them after trying): every gradient of the BatchNorm MLP the lesson blanks,
as ``{name: fn(f, g)}`` over the forward's values ``f`` and the gradients computed before it ``g``. ``SLIP`` is one
planted mistake — the BatchNorm variance's gradient without its ``-1/2`` — which the check must name (the suite runs
the lesson with it: ``JNNEX_LESSON_ANSWERS=slip``)."""

import jax.numpy as jnp

SOLUTIONS = {
    # cross-entropy: only the picked log-probabilities matter, each with -1/n
    "dlogprobs": lambda f, g: -jnp.eye(f.logprobs.shape[1], dtype=f.logprobs.dtype)[f.y] / f.y.shape[0],
    # log: d log p = dp / p
    "dprobs": lambda f, g: g.dlogprobs / f.probs,
    # tanh: d tanh(u) = (1 - tanh(u)²) du
    "dhpreact": lambda f, g: (1.0 - f.h**2) * g.dh,
    # bnraw = bndiff * bnvar_inv: bnvar_inv (1, H) was broadcast over the rows, so its gradient sums them
    "dbnvar_inv": lambda f, g: (f.bndiff * g.dbnraw).sum(0, keepdims=True),
    # bnvar_inv = (bnvar + eps) ** -1/2
    "dbnvar": lambda f, g: -0.5 * (f.bnvar + f.eps) ** -1.5 * g.dbnvar_inv,
    # the embedding gather: a scatter-add back into the table (a repeated character accumulates)
    "dC": lambda f, g: jnp.zeros_like(f.C).at[f.x.reshape(-1)].add(g.demb.reshape(-1, f.C.shape[1])),
}

SLIP = {"dbnvar": lambda f, g: (f.bnvar + f.eps) ** -1.5 * g.dbnvar_inv}  # the -1/2 forgotten

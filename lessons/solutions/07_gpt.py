"""Solution to lesson 7's exercise: LayerNorm's backward (llm.c's form). ``SLIP`` forgets the term that comes from
the variance's dependence on ``x`` — the check must name ``dx`` alone (``dw`` and ``db`` stay right)."""


def layernorm_backward(dy, cache):
    x, w, mean, rstd, has_shift = cache
    n = (x - mean) * rstd  # the normalised input, recomputed
    g = dy * w.reshape((1,) * (dy.ndim - 1) + w.shape)  # w along the last axis of every row
    dx = rstd * (g - g.mean(-1, keepdims=True) - n * (g * n).mean(-1, keepdims=True))
    C = x.shape[-1]
    return dx, (dy * n).reshape(-1, C).sum(0), dy.reshape(-1, C).sum(0) if has_shift else None


def slipped(dy, cache):
    x, w, mean, rstd, has_shift = cache
    n = (x - mean) * rstd
    g = dy * w.reshape((1,) * (dy.ndim - 1) + w.shape)  # w along the last axis of every row
    dx = rstd * (g - g.mean(-1, keepdims=True))  # the variance's path left out
    C = x.shape[-1]
    return dx, (dy * n).reshape(-1, C).sum(0), dy.reshape(-1, C).sum(0) if has_shift else None


SOLUTIONS = {"layernorm_backward": layernorm_backward}
SLIP = {"layernorm_backward": slipped}

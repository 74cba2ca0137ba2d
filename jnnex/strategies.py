"""Hypothesis strategies for property-testing forward/backward pairs — jnnex's own suites use these; so can yours.

Needs the ``test`` extra (``pip install "jnnex[test]"``, which brings Hypothesis). Everything follows the house rules
for Hypothesis with JAX:

* shapes are drawn from small fixed sets (every new shape is a new XLA compilation);
* arrays are well conditioned — standard normal × ``scale`` from a drawn seed, no subnormals (XLA on CPU flushes them
  to zero, numpy does not), no infinities or NaNs — and float64 when ``jax_enable_x64`` is on (the dtype a meaningful
  check needs), float32 otherwise (:func:`jnnex.check.tolerances` fits the tolerance to it);
* parameters are random, never 0/1: biases and BatchNorm γ/β are perturbed (zeros hide a wrong backward).

Each ``*_args`` strategy draws the argument tuple of one :mod:`jnnex.layers` forward, ready for
:func:`jnnex.check.check_backward`::

    from jnnex import layers, strategies
    from jnnex.check import check_backward

    def test_my_batchnorm_backward():
        check_backward(layers.batchnorm_forward, my_batchnorm_backward, strategies.batchnorm_args())
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from jnnex.models.bn_mlp import BN_MLP_SMALL, BNMLPConfig, BNMLPParams, bn_mlp
from jnnex.check import randomise  # used below, and re-exported for users building their own problems

BATCH_SIZES = (2, 3, 8, 32, 64)  # 2 is the smallest batch BatchNorm accepts in train mode
WIDTHS = (1, 3, 8)


def seeds() -> st.SearchStrategy[int]:
    return st.integers(0, 2**31 - 1)


def default_dtype():
    """float64 when ``jax_enable_x64`` is on (what a meaningful check needs), else float32."""
    return np.float64 if jax.config.jax_enable_x64 else np.float32


def arrays(shape, *, dtype=None, scale: float = 1.0, offset: float = 0.0) -> st.SearchStrategy[jax.Array]:
    """Arrays of ``shape``: ``offset + scale · N(0, 1)`` from a drawn seed, as ``dtype`` (default
    :func:`default_dtype`); never subnormal."""
    shape = tuple(shape)
    dtype = dtype or default_dtype()

    def make(seed):
        a = offset + scale * np.random.default_rng(seed).standard_normal(shape)
        tiny = np.finfo(dtype).tiny
        a = np.where(np.abs(a) < tiny, 0.0, a)  # flush subnormals the way XLA on CPU would
        return jnp.asarray(a.astype(dtype))

    return seeds().map(make)


def indices(shape, n: int, *, repeat: bool = True) -> st.SearchStrategy[jax.Array]:
    """int32 indices in ``[0, n)`` of ``shape``; with ``repeat`` the last one copies the first (a scatter-add must
    accumulate repeated indices)."""
    shape = tuple(shape)

    def make(seed):
        ix = np.random.default_rng(seed).integers(0, n, shape).astype(np.int32)
        if repeat and ix.size > 1:
            ix.reshape(-1)[-1] = ix.reshape(-1)[0]
        return jnp.asarray(ix)

    return seeds().map(make)


def batch_sizes(min_size: int = 2, max_size: int = 64) -> st.SearchStrategy[int]:
    return st.sampled_from([b for b in BATCH_SIZES if min_size <= b <= max_size])


@st.composite
def linear_args(draw, dtype=None):
    """``(x (B, [T,] Cin), W (Cin, Cout), b (Cout,))`` for :func:`jnnex.layers.linear_forward`."""
    lead = draw(st.sampled_from([(draw(batch_sizes()),), (4, 3)]))
    cin, cout = draw(st.sampled_from(WIDTHS)), draw(st.sampled_from(WIDTHS))
    return (draw(arrays(lead + (cin,), dtype=dtype)), draw(arrays((cin, cout), dtype=dtype, scale=cin**-0.5)),
            draw(arrays((cout,), dtype=dtype, scale=0.3)))


@st.composite
def tanh_args(draw, dtype=None):
    """``(x (B, C),)`` spread over tanh's curved and saturating range."""
    return (draw(arrays((draw(batch_sizes()), draw(st.sampled_from(WIDTHS))), dtype=dtype, scale=2.0)),)


@st.composite
def batchnorm_args(draw, dtype=None):
    """``(x (B, C) or (B, T, C), γ (C,), β (C,))`` with γ around 1 and β around 0, never exactly."""
    C = draw(st.sampled_from(WIDTHS))
    lead = draw(st.sampled_from([(draw(batch_sizes()),), (draw(batch_sizes(max_size=8)), 3)]))
    return (draw(arrays(lead + (C,), dtype=dtype, scale=draw(st.sampled_from([0.1, 1.0, 10.0])),
                        offset=draw(st.sampled_from([0.0, 3.0])))),
            draw(arrays((C,), dtype=dtype, scale=0.3, offset=1.0)), draw(arrays((C,), dtype=dtype, scale=0.3)))


@st.composite
def embedding_args(draw, dtype=None):
    """``(C (V, n_embd), ix (B, T))`` with a repeated index and (for V > B·T) rows never looked up."""
    V, n_embd, B, T = (draw(st.sampled_from(s)) for s in ((5, 27), (2, 10), (2, 8), (1, 3)))
    return draw(arrays((V, n_embd), dtype=dtype)), draw(indices((B, T), V))


@st.composite
def cross_entropy_args(draw, dtype=None):
    """``(logits (B, V), y (B,))``, logits of scale 0.1 … 10 (a near-uniform to a confident model)."""
    B, V = draw(batch_sizes()), draw(st.sampled_from((5, 27)))
    return (draw(arrays((B, V), dtype=dtype, scale=draw(st.sampled_from([0.1, 1.0, 10.0])))),
            draw(indices((B,), V, repeat=False)))


@st.composite
def gated_tanh_args(draw, dtype=None):
    """``(x (B, [T,] 2H),)``: filter and gate pre-activations over their curved and saturating range."""
    lead = draw(st.sampled_from([(draw(batch_sizes()),), (4, 3)]))
    return (draw(arrays(lead + (2 * draw(st.sampled_from(WIDTHS)),), dtype=dtype, scale=2.0)),)


@st.composite
def rnn_cell_args(draw, dtype=None):
    """``(x (B, E), h (B, H), W (E + H, H), b (H,))``: one recurrent step, the state in tanh's range."""
    B, E, H = draw(batch_sizes()), draw(st.sampled_from(WIDTHS)), draw(st.sampled_from(WIDTHS))
    return (draw(arrays((B, E), dtype=dtype)), draw(arrays((B, H), dtype=dtype, scale=0.5)),
            draw(arrays((E + H, H), dtype=dtype, scale=(E + H) ** -0.5)), draw(arrays((H,), dtype=dtype, scale=0.3)))


@st.composite
def gru_cell_args(draw, dtype=None):
    """``(x (B, E), h (B, H), Wz, bz, Wr, br, Wh, bh)``: one gated recurrent step."""
    B, E, H = draw(batch_sizes()), draw(st.sampled_from(WIDTHS)), draw(st.sampled_from(WIDTHS))
    linear = [draw(arrays(shape, dtype=dtype, scale=s)) for _ in range(3)
              for shape, s in (((E + H, H), (E + H) ** -0.5), ((H,), 0.3))]
    return (draw(arrays((B, E), dtype=dtype)), draw(arrays((B, H), dtype=dtype, scale=0.5)), *linear)


@st.composite
def causal_average_args(draw, dtype=None):
    """``(x (B, T, C),)`` with ``T = 1`` included."""
    B, T, C = draw(batch_sizes(max_size=8)), draw(st.sampled_from([1, 3, 16])), draw(st.sampled_from(WIDTHS))
    return (draw(arrays((B, T, C), dtype=dtype)),)


@st.composite
def flatten_consecutive_args(draw, dtype=None):
    """``(x (B, T, C), n)`` with ``T`` a multiple of ``n`` (``T = n`` included: the tree's root level)."""
    n = draw(st.sampled_from([2, 4]))
    B, T, C = draw(batch_sizes(max_size=8)), n * draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from(WIDTHS))
    return draw(arrays((B, T, C), dtype=dtype)), n


@st.composite
def causal_conv_args(draw, dtype=None):
    """``(x (B, L, Cin), W (2·Cin, Cout), dilation)`` with ``1 <= dilation < L`` (``L = dilation + 1``: one output)."""
    d = draw(st.sampled_from([1, 2, 4]))
    B, L = draw(batch_sizes(max_size=8)), d + draw(st.sampled_from([1, 3, 8]))
    cin, cout = draw(st.sampled_from(WIDTHS)), draw(st.sampled_from(WIDTHS))
    return (draw(arrays((B, L, cin), dtype=dtype)), draw(arrays((2 * cin, cout), dtype=dtype, scale=(2 * cin)**-0.5)),
            d)


@st.composite
def token_position_embedding_args(draw, dtype=None):
    """``(wte (V, C), wpe (T_max, C), ix (B, T))`` with ``T <= T_max`` (``T = 1`` included) and a repeated token."""
    V, C, B = draw(st.sampled_from((5, 27))), draw(st.sampled_from((2, 8))), draw(st.sampled_from((1, 3)))
    T_max = draw(st.sampled_from((1, 4, 6)))
    T = draw(st.integers(1, T_max))
    return (draw(arrays((V, C), dtype=dtype, scale=0.5)), draw(arrays((T_max, C), dtype=dtype, scale=0.5)),
            draw(indices((B, T), V)))


@st.composite
def layernorm_args(draw, dtype=None):
    """``(x (B, [T,] C), w (C,), b (C,))``: rows of scale 0.1 … 10 and offset 0 or 3, ``w`` around 1, ``b`` around 0."""
    C = draw(st.sampled_from((2, 3, 8)))
    lead = draw(st.sampled_from([(draw(batch_sizes(max_size=8)),), (2, draw(st.sampled_from((1, 3))))]))
    return (draw(arrays(lead + (C,), dtype=dtype, scale=draw(st.sampled_from([0.1, 1.0, 10.0])),
                        offset=draw(st.sampled_from([0.0, 3.0])))),
            draw(arrays((C,), dtype=dtype, scale=0.3, offset=1.0)), draw(arrays((C,), dtype=dtype, scale=0.3)))


@st.composite
def gelu_args(draw, dtype=None):
    """``(x (B, T, C),)`` over GELU's negative tail, its bend and its linear side."""
    B, T, C = draw(st.sampled_from((1, 3))), draw(st.sampled_from((1, 4))), draw(st.sampled_from(WIDTHS))
    return (draw(arrays((B, T, C), dtype=dtype, scale=3.0)),)


def _attention_shape(draw):
    """``(B, T, n_head, head_size)`` with ``T = 1`` (a row that sees only itself) and one-element heads included."""
    return (draw(st.sampled_from((1, 2))), draw(st.sampled_from((1, 2, 5))), draw(st.sampled_from((1, 2, 3))),
            draw(st.sampled_from((1, 2, 4))))


@st.composite
def split_heads_args(draw, dtype=None):
    """``(qkv (B, T, 3C), n_head)``, ``C = n_head · head_size``."""
    B, T, nh, hs = _attention_shape(draw)
    return draw(arrays((B, T, 3 * nh * hs), dtype=dtype, scale=draw(st.sampled_from([0.5, 3.0])))), nh


@st.composite
def attend_args(draw, dtype=None):
    """``(q, k, v)``, each ``(B, nh, T, hs)``; queries and keys of scale up to 3 (peaked rows)."""
    B, T, nh, hs = _attention_shape(draw)
    scale = draw(st.sampled_from([0.5, 3.0]))
    return tuple(draw(arrays((B, nh, T, hs), dtype=dtype, scale=scale)) for _ in range(3))


@st.composite
def self_attention_args(draw, dtype=None):
    """``(x (B, T, C), W_qkv (C, 3C), b_qkv (3C,), W_proj (C, C), b_proj (C,), n_head)``."""
    B, T, nh, hs = _attention_shape(draw)
    C = nh * hs
    return (draw(arrays((B, T, C), dtype=dtype)), draw(arrays((C, 3 * C), dtype=dtype, scale=2 * C**-0.5)),
            draw(arrays((3 * C,), dtype=dtype, scale=0.3)), draw(arrays((C, C), dtype=dtype, scale=C**-0.5)),
            draw(arrays((C,), dtype=dtype, scale=0.3)), nh)


@st.composite
def residual_args(draw, dtype=None):
    """``(a, b)``, both ``(B, T, C)``."""
    shape = (draw(st.sampled_from((1, 3))), draw(st.sampled_from((1, 4))), draw(st.sampled_from(WIDTHS)))
    return draw(arrays(shape, dtype=dtype)), draw(arrays(shape, dtype=dtype))


@st.composite
def sequence_cross_entropy_args(draw, dtype=None):
    """``(logits (B, T, V), y (B, T))`` with ``-1`` (ignored) in each row's tail, as a padded word's targets."""
    B, T, V = draw(st.sampled_from((1, 3))), draw(st.sampled_from((1, 4, 6))), draw(st.sampled_from((5, 27)))
    logits = draw(arrays((B, T, V), dtype=dtype, scale=draw(st.sampled_from([0.1, 1.0, 10.0]))))
    y = np.asarray(draw(indices((B, T), V, repeat=False)))
    lengths = np.random.default_rng(draw(seeds())).integers(1, T + 1, B)  # at least one target per row
    return logits, jnp.asarray(np.where(np.arange(T)[None] < lengths[:, None], y, -1).astype(np.int32))


# The Llama block's pairs (jnnex.models.llama) and the tiled attention (jnnex.models.flash)


@st.composite
def rmsnorm_args(draw, dtype=None):
    """``(x (..., C), g (C,))``: rows of scale 0.1 … 10 and offset 0 or 3 (RMSNorm does not centre), ``g`` around 1."""
    C = draw(st.sampled_from((1, 3, 8)))
    lead = draw(st.sampled_from([(draw(batch_sizes(max_size=8)),), (2, draw(st.sampled_from((1, 3))))]))
    return (draw(arrays(lead + (C,), dtype=dtype, scale=draw(st.sampled_from([0.1, 1.0, 10.0])),
                        offset=draw(st.sampled_from([0.0, 3.0])))),
            draw(arrays((C,), dtype=dtype, scale=0.3, offset=1.0)))


@st.composite
def rope_args(draw, dtype=None):
    """``(x (B, nh, T, hs), pos0)``: even head sizes (2 included), positions from 0 or far along a KV cache."""
    B, T, nh, _ = _attention_shape(draw)
    hs = draw(st.sampled_from((2, 4, 8)))
    return draw(arrays((B, nh, T, hs), dtype=dtype)), draw(st.sampled_from((0, 3, 1000)))


@st.composite
def swiglu_args(draw, dtype=None):
    """``(h (B, T, 2H),)`` over the gate's negative tail, its bend and its linear side."""
    B, T, H = draw(st.sampled_from((1, 3))), draw(st.sampled_from((1, 4))), draw(st.sampled_from(WIDTHS))
    return (draw(arrays((B, T, 2 * H), dtype=dtype, scale=3.0)),)


@st.composite
def moe_args(draw, dtype=None):
    """``(x (B, T, C), W_router (C, E), W1 (E, C, H), W2 (E, H, C), top_k, capacity, groups, None, None)``: 2–4 experts,
    every top-k from 1 to all, sometimes two router columns equal — logits that tie exactly, the choice going to the
    lower index — and a capacity of 1 slot up to dropless (``None``) over 1 or more groups: dropped tokens."""
    B, T, C = draw(st.sampled_from((1, 3))), draw(st.sampled_from((1, 4))), draw(st.sampled_from((2, 4)))
    E = draw(st.sampled_from((2, 3, 4)))
    H = draw(st.sampled_from((2, 3)))
    k = draw(st.integers(1, E))
    W_router = draw(arrays((C, E), dtype=dtype, scale=C**-0.5))
    if draw(st.booleans()):  # experts 0 and E - 1 tie for every token
        W_router = W_router.at[:, E - 1].set(W_router[:, 0])
    groups = draw(st.sampled_from([g for g in (1, 2, 3) if (B * T) % g == 0]))
    capacity = draw(st.one_of(st.none(), st.integers(1, max(1, B * T // groups))))
    return (draw(arrays((B, T, C), dtype=dtype)), W_router, draw(arrays((E, C, H), dtype=dtype, scale=C**-0.5)),
            draw(arrays((E, H, C), dtype=dtype, scale=H**-0.5)), k, capacity, groups, None, None)


def _gqa_heads(draw):
    """``(n_head, n_kv_head)``: one shared head, groups of two and three, and plain multi-head."""
    return draw(st.sampled_from(((1, 1), (2, 1), (2, 2), (4, 2), (3, 1), (6, 2))))


@st.composite
def split_gqa_args(draw, dtype=None):
    """``(qkv (B, T, (nh + 2 nkv) hs), n_head, n_kv_head)``."""
    B, T, _, hs = _attention_shape(draw)
    nh, nkv = _gqa_heads(draw)
    return draw(arrays((B, T, (nh + 2 * nkv) * hs), dtype=dtype)), nh, nkv


@st.composite
def repeat_kv_args(draw, dtype=None):
    """``(x (B, nkv, T, hs), n_rep)``."""
    B, T, nkv, hs = _attention_shape(draw)
    return draw(arrays((B, nkv, T, hs), dtype=dtype)), draw(st.sampled_from((1, 2, 3)))


@st.composite
def flash_attend_args(draw, dtype=None):
    """``(q, k, v, tile)``: lengths that are and are not multiples of the tile, ``T = 1``, a tile longer than the
    sequence, and queries and keys of scale up to 3 (peaked rows; scores of ±1e4 are tests/test_llama.py's
    fixed cases, with a tolerance relative to the terms that cancel)."""
    B, _, nh, hs = _attention_shape(draw)
    T, tile = draw(st.sampled_from((1, 2, 5, 8, 13))), draw(st.sampled_from((1, 2, 4, 16)))
    scale = draw(st.sampled_from([0.5, 3.0]))
    return (*(draw(arrays((B, nh, T, hs), dtype=dtype, scale=scale)) for _ in range(3)), tile)


@st.composite
def llama_attention_args(draw, dtype=None):
    """``(x (B, T, C), W_qkv (C, (nh + 2 nkv) hs), W_proj (C, C), n_head, n_kv_head, tile)``, ``tile`` None (the plain
    attention) or a tile size."""
    B, T, _, _ = _attention_shape(draw)
    nh, nkv = _gqa_heads(draw)
    hs = draw(st.sampled_from((2, 4)))
    C = nh * hs
    return (draw(arrays((B, T, C), dtype=dtype)),
            draw(arrays((C, (nh + 2 * nkv) * hs), dtype=dtype, scale=2 * C**-0.5)),
            draw(arrays((C, C), dtype=dtype, scale=C**-0.5)), nh, nkv, draw(st.sampled_from((None, 2, 3))))


@st.composite
def lm_configs(draw, shapes=("bn-mlp", "deep", "no-batchnorm")):
    """Small :class:`~jnnex.bn_mlp.BNMLPConfig` s over T, n_embd, n_hidden and V: the lecture's single-BatchNorm
    net (``bn-mlp``), a 3-layer BatchNorm stack (``deep``), and 2 layers without BatchNorm."""
    shape = {"bn-mlp": dict(BN_MLP_SMALL), "deep": dict(n_layers=3),
             "no-batchnorm": dict(n_layers=2, batchnorm=False, final_batchnorm=False)}[draw(st.sampled_from(shapes))]
    return BNMLPConfig(**{**shape, "vocab_size": draw(st.sampled_from([5, 27])),
                          "block_size": draw(st.sampled_from([1, 3])), "n_embd": draw(st.sampled_from([2, 5])),
                          "n_hidden": draw(st.sampled_from([4, 12]))})


@st.composite
def lm_problems(draw, configs=None, batch=None, dtype=jnp.float64):
    """``(cfg, params, state, x, y)``: a config, its random parameters (random biases and γ/β), its running state,
    and a batch of windows ``x (B, T)`` with a repeated character and targets ``y (B,)``."""
    cfg = draw(configs if configs is not None else lm_configs())
    B = draw(batch if batch is not None else batch_sizes())
    k1, k2 = jax.random.split(jax.random.key(draw(seeds())))
    params, state = bn_mlp(cfg).init(k1)
    params: BNMLPParams = randomise(params, k2, dtype)
    state = jax.tree.map(lambda s: s.astype(dtype), state)
    x = draw(indices((B, cfg.block_size), cfg.vocab_size))
    y = draw(indices((B,), cfg.vocab_size, repeat=False))
    return cfg, params, state, x, y


# ----------------------------------------------------------------------------------------------------------------------
# The arguments drawn for every pair a module declares (its PAIRS: jnnex.layers.Pair), by module and pair name


PAIR_ARGS = {
    "jnnex.layers": {"linear": linear_args, "tanh": tanh_args, "embedding": embedding_args,
                     "cross_entropy": lambda: st.one_of(cross_entropy_args(), sequence_cross_entropy_args()),
                     "batchnorm": batchnorm_args},
    "jnnex.models.gpt": {"token_position_embedding": token_position_embedding_args, "layernorm": layernorm_args,
                         "gelu": gelu_args, "residual": residual_args, "split_heads": split_heads_args,
                         "attend": attend_args, "qkv_attention": split_heads_args,
                         "self_attention": self_attention_args},
    "jnnex.models.llama": {"rmsnorm": rmsnorm_args, "rope": rope_args, "swiglu": swiglu_args,
                           "split_gqa": split_gqa_args, "repeat_kv": repeat_kv_args,
                           "attention": llama_attention_args},
    "jnnex.models.flash": {"flash_attend": flash_attend_args},
    "jnnex.models.moe": {"moe": moe_args},
    "jnnex.models.rnn": {"rnn_cell": rnn_cell_args, "gru_cell": gru_cell_args},
    "jnnex.models.bow": {"causal_average": causal_average_args},
    "jnnex.models.wavenet": {"flatten_consecutive": flatten_consecutive_args, "causal_conv": causal_conv_args,
                             "gated_tanh": gated_tanh_args},
    "jnnex.micrograd.tensor_mlp": {"relu": tanh_args},
}


def pair_args(module: str, name: str):
    """The strategy of the arguments of pair ``name`` that ``module`` (its ``__name__``) declares; a clear error for a
    declared pair no strategy draws for yet."""
    try:
        return PAIR_ARGS[module][name]()
    except KeyError:
        raise KeyError(f"pair {name!r} of {module} has no strategy: add its *_args to jnnex.strategies.PAIR_ARGS"
                       f"[{module!r}]") from None

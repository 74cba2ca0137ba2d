"""The model registry: the one place a language model declares itself.

A model joins jnnex by adding one :class:`ModelSpec` to :data:`REGISTRY`. From that entry alone, ``jnnex train /
sample / eval / diagnose``, the benchmarks and ``tests/test_models.py`` pick it up: its config's fields become
command-line flags (with the help text written beside each field), a hand-written backward (the model's
``backward_fn``) enables ``--backward manual``, diagnostics and the manual-vs-autodiff benchmarks, and a closed-form
``fit_fn`` replaces gradient training. A run of a registered model — made, trained, resumed, loaded — is
:mod:`jnnex.run`'s.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from jnnex.data import Vocab
from jnnex.lm import LanguageModel
from jnnex.models import bigram
from jnnex.models.bigram import BigramConfig, counting_bigram, neural_bigram
from jnnex.models.bn_mlp import BN_MLP_SMALL, BNMLPConfig, bn_mlp
from jnnex.models.bow import BoWConfig, bow
from jnnex.models.gpt import GPT2_SMALL, GPTConfig, gpt
from jnnex.models.llama import LlamaConfig, llama
from jnnex.models.mlp_lm import MLPConfig, mlp_lm
from jnnex.models.rnn import RNNConfig, rnn
from jnnex.models.wavenet import WaveNetConfig, WaveNetConvConfig, wavenet, wavenet_conv
from jnnex.optim import TrainConfig


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    build: Callable[[Any], LanguageModel]  # config -> model
    config_cls: type  # the model's frozen config dataclass (fields declared with jnnex.settings.setting)
    train: TrainConfig | None  # default optimisation settings; None for a model fitted in closed form
    split: tuple[float, ...] = (0.8, 0.1, 0.1)  # default train/dev/test word fractions
    fit_fn: Callable | None = None  # (cfg, X, Y) -> (params, state): fitted in closed form, not by gradient steps
    per_position: bool = False  # the model predicts every position of a padded word (as its LanguageModel says)
    presets: dict[str, tuple[dict, dict]] = dataclasses.field(default_factory=dict)  # name -> (model, train) overrides
    summary: str = ""
    defaults: dict = dataclasses.field(default_factory=dict)  # config fields that differ from config_cls's defaults

    def __post_init__(self):
        if (self.train is None) != (self.fit_fn is not None):
            raise ValueError("a ModelSpec has training settings (train) or a closed-form fit_fn, exactly one")

    def config(self, **overrides):
        """The model config: ``config_cls`` defaults, then this entry's ``defaults``, then ``overrides``."""
        return self.config_cls(**{**self.defaults, **overrides})


# makemore.py's optimiser (its rnn, gru, bow and transformer): AdamW, lr 5e-4 constant, weight decay 0.01 on every
# parameter, betas (0.9, 0.99).
MAKEMORE_TRAIN = TrainConfig(steps=50_000, lr=5e-4, lr_boundaries=(), optimizer="adamw", betas=(0.9, 0.99),
                        weight_decay=0.01, eval_every=5_000)

NANOGPT_LAYOUT = {"bias": False, "tie": True, "dropout": 0.0}
NANOGPT_TRAIN = {"optimizer": "adamw", "lr": 1e-3, "schedule": "cosine", "warmup": 100, "min_lr": 1e-4,
                 "betas": (0.9, 0.99), "weight_decay": 0.1, "decay_mask": "matrices", "grad_clip": 1.0,
                 "eval_iters": 20}

REGISTRY: dict[str, ModelSpec] = {
    "bigram": ModelSpec(
        counting_bigram, BigramConfig, None, split=(1.0,), fit_fn=bigram.fit,
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
        mlp_lm, MLPConfig, TrainConfig(),
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
        summary="one hidden layer (200) with BatchNorm, as in makemore parts 3-4",
    ),
    "deep-mlp": ModelSpec(
        bn_mlp, BNMLPConfig, TrainConfig(),
        summary="5 hidden layers of 100, Linear -> BatchNorm -> tanh, final BatchNorm (makemore part 3)",
    ),
    "wavenet": ModelSpec(
        # makemore part 5: 200k steps, batch 32, SGD 0.1, then 0.01 from step 150,000.
        wavenet, WaveNetConfig, TrainConfig(lr_boundaries=(150_000,)),
        presets={
            # The lecture's challenge, beaten in the same 200k steps of 32 (val <= 1.95; the lecture: 1.9937): WaveNet's
            # gated activations, dropout 0.1 after every level, AdamW (lr 1e-3, weight decay 0.01, all parameters),
            # lr x 0.1 from step 150,000. Chosen on the dev split only.
            "improved": ({"gated": True, "dropout": 0.1},
                         {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.01}),
        },
        summary="WaveNet-style tree: 8 characters fused two at a time over 3 levels (makemore part 5)",
    ),
    "wavenet-conv": ModelSpec(
        # The lecture's schedule on the lecture's number of predicted characters: a step of 32 names.txt words
        # predicts ~228 characters, so 28,000 steps see the 6.4M of 200,000 steps of 32 windows; lr 0.01 from 3/4.
        wavenet_conv, WaveNetConvConfig, TrainConfig(steps=28_000, lr_boundaries=(21_000,), eval_every=4_000),
        per_position=True,
        summary="the WaveNet tree as causal dilated convolutions over whole words, every position predicted",
    ),
    "rnn": ModelSpec(
        rnn, RNNConfig, MAKEMORE_TRAIN, per_position=True,
        summary="recurrent net, h_t = tanh([C[x_t], h_{t-1}] W + b), backprop through time by hand (makemore.py)",
    ),
    "gru": ModelSpec(
        rnn, RNNConfig, MAKEMORE_TRAIN, defaults={"cell": "gru"}, per_position=True,
        summary="gated recurrent net: update and reset gates (Cho et al. 2014), backprop through time by hand",
    ),
    "bow": ModelSpec(
        bow, BoWConfig, MAKEMORE_TRAIN, per_position=True,
        summary="causal bag of words: each position averages the ones before it, then an MLP block (makemore.py)",
    ),
    "gpt": ModelSpec(
        gpt, GPTConfig, MAKEMORE_TRAIN, per_position=True,
        presets={
            # Below makemore's transformer on the lecture split (val 1.929 against 2.018 at its best step; 3 seeds):
            # twice as wide (802,304 parameters), residual dropout 0.3, AdamW at lr 1e-3 with weight decay 0.1 on the
            # matrices only, lr x 0.1 at steps 30,000 and 45,000 of 50,000. Chosen on the dev split only.
            "improved": ({"n_embd": 128, "dropout": 0.3},
                         {"lr": 1e-3, "weight_decay": 0.1, "decay_mask": "matrices", "lr_boundaries": (30_000, 45_000)}),
            # nanoGPT's Shakespeare recipes, for a text (--data tinyshakespeare.txt): its layout (no biases, the head
            # tied to wte), AdamW lr 1e-3 with 100 warmup steps and a cosine to 1e-4, betas (0.9, 0.99), weight decay
            # 0.1 on the matrices, gradients clipped to norm 1; the loss estimated on 20 random batches a split.
            # The README's CPU command: 4 layers, 4 heads, n_embd 128, block 64, batch 12, 2,000 iterations.
            "shakespeare-cpu": (dict(NANOGPT_LAYOUT, n_layer=4, n_head=4, n_embd=128, block_size=64),
                                dict(NANOGPT_TRAIN, steps=2_000, batch_size=12, eval_every=2_000, chunk=50)),
            # The CPU recipe on BPE tokens (with --tokenizer bpe --vocab-size 512): n_embd 124 keeps the parameter
            # count within 1 % of the character model's (810,588 against 804,096: the larger table of a tied head
            # paid for by a narrower stream); compare the two per byte (val_loss_per_byte).
            "shakespeare-cpu-bpe": (dict(NANOGPT_LAYOUT, n_layer=4, n_head=4, n_embd=124, block_size=64),
                                    dict(NANOGPT_TRAIN, steps=2_000, batch_size=12, eval_every=2_000, chunk=50)),
            # config/train_shakespeare_char.py (for a GPU): 6 layers, 6 heads, n_embd 384, block 256, batch 64,
            # dropout 0.2, 5,000 iterations: 10.65 M parameters (nanoGPT's count, without the position table).
            "shakespeare": (dict(NANOGPT_LAYOUT, n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2),
                            dict(NANOGPT_TRAIN, steps=5_000, batch_size=64, eval_every=500, chunk=25)),
            # GPT-2 small's shape (jnnex.models.gpt.GPT2_SMALL; 124,439,808 parameters at GPT-2's 50,257 tokens,
            # 124,475,904 at nanoGPT's padded 50,304 — the vocabulary comes from the data or --vocab-size) and
            # nanoGPT's train_gpt2.py optimisation: AdamW lr 6e-4, 2,000 warmup steps, a cosine to 6e-5 over 600,000,
            # betas (0.9, 0.95), weight decay 0.1 on the matrices, clipped to norm 1; its batch is 12 × 1,024 tokens
            # a device (nanoGPT accumulates 40 of those on each of 8 GPUs: ~0.5 M tokens a step). For GPUs:
            # `jnnex plan --preset gpt2-124m` gives its memory per device.
            "gpt2-124m": (dict(GPT2_SMALL),
                          dict(NANOGPT_TRAIN, lr=6e-4, warmup=2_000, min_lr=6e-5, betas=(0.9, 0.95), steps=600_000,
                               batch_size=12, eval_every=2_000, chunk=100, eval_iters=200)),
            # GPT-3 XL's shape (Brown et al. 2020, table 2.1: 24 layers, d_model 2,048, 16 heads of 128, context
            # 2,048; 1.3 B parameters), GPT-2's layout and optimisation: a shape for `jnnex plan`.
            "gpt3-1.3b": (dict(GPT2_SMALL, n_layer=24, n_head=16, n_embd=2048, block_size=2048),
                          dict(NANOGPT_TRAIN, lr=2e-4, warmup=2_000, min_lr=2e-5, betas=(0.9, 0.95), steps=600_000,
                               batch_size=4, eval_every=2_000, chunk=100, eval_iters=200)),
        },
        summary="GPT-2 transformer (makemore.py's: 4 layers, 4 heads, n_embd 64), every gradient by hand (llm.c)",
    ),
    "llama": ModelSpec(
        llama, LlamaConfig, MAKEMORE_TRAIN, per_position=True,
        presets={
            # The best reached on names.txt within this CPU's budget (chosen on dev, seed 0, between AdamW and Muon at
            # the same settings: 1.9335 against 1.9283): the GPT improved preset's width, dropout, lr and weight decay,
            # Muon on the linear layers' matrices, 30,000 steps with the lr x 0.1 at 18,000 and 27,000. 810,880
            # parameters. Seeds 0-2: dev 1.9255 +- 0.0034; the goal, val <= 1.90, is not reached.
            "improved": ({"n_embd": 128, "dropout": 0.3},
                         {"optimizer": "muon", "lr": 1e-3, "weight_decay": 0.1, "decay_mask": "matrices",
                          "steps": 30_000, "lr_boundaries": (18_000, 27_000), "eval_every": 3_000}),
            # The GPT's shakespeare-cpu recipe, block for block: the same training settings and shape (4 layers, 4
            # heads, n_embd 128, block 64, the head tied), no biases as in every Llama, SwiGLU 342 wide (a multiple
            # of 2): 796,928 parameters against the GPT's 804,096 (whose position table the rotary positions drop).
            "shakespeare-cpu": ({"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "tie": True,
                                 "ffn_multiple": 2},
                                dict(NANOGPT_TRAIN, steps=2_000, batch_size=12, eval_every=2_000, chunk=50)),
            # Shapes for `jnnex plan`. Llama 3 8B (Meta 2024): 32 layers, 4,096 wide, 32 query heads sharing 8
            # key/value heads, SwiGLU 14,336 wide (ffn_multiple 14,336: 8/3 · 4,096 rounded up to it), RoPE base
            # 500,000, context 8,192 (its vocabulary, 128,256, from --vocab-size). Mixtral 8x7B's shape (Jiang et al.
            # 2024): the same attention, each MLP 8 experts, 2 a token; jnnex's experts are GELU MLPs (two matrices),
            # 21,504 wide to hold a SwiGLU expert's 3 · 4,096 · 14,336 parameters; context 8,192 here (Mixtral's
            # 32,768 would make the plan's activations four times Llama 3's). Mixtral is dropless (block-sparse
            # kernels); jnnex's dropless buffers hold every token for every expert, E / k times a capacity factor
            # 1's, so the shape plans Switch's capacity factor, 1.25.
            "llama3-8b": ({"n_layer": 32, "n_head": 32, "n_kv_head": 8, "n_embd": 4096, "ffn_multiple": 14_336,
                           "rope_base": 500_000.0, "block_size": 8192},
                          dict(NANOGPT_TRAIN, lr=3e-4, warmup=2_000, min_lr=3e-5, betas=(0.9, 0.95), steps=600_000,
                               batch_size=1, eval_every=2_000, chunk=100, eval_iters=200)),
            "mixtral-8x7b": ({"n_layer": 32, "n_head": 32, "n_kv_head": 8, "n_embd": 4096, "ffn_multiple": 14_336,
                              "rope_base": 1_000_000.0, "block_size": 8192, "n_expert": 8, "expert_top_k": 2,
                              "expert_hidden": 21_504, "expert_capacity": 1.25},
                             dict(NANOGPT_TRAIN, lr=3e-4, warmup=2_000, min_lr=3e-5, betas=(0.9, 0.95),
                                  steps=600_000, batch_size=1, eval_every=2_000, chunk=100, eval_iters=200)),
        },
        summary="Llama block: RMSNorm, rotary positions, SwiGLU, grouped-query attention (plain or tiled), every "
                "gradient by hand",
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


def config_for_words(spec: ModelSpec, words, vocab: Vocab, **overrides):
    """``spec``'s model config for a corpus: its vocabulary size from ``vocab``, and a per-position model's context
    the longest word + 1 (makemore's ``block_size``) unless ``overrides`` set ``block_size``."""
    if spec.per_position and "block_size" not in overrides:
        overrides = {**overrides, "block_size": max(len(w) for w in words) + 1}
    return spec.config(vocab_size=vocab.size, **overrides)


def build_for_words(spec: ModelSpec, words, vocab: Vocab, **overrides) -> LanguageModel:
    """``spec``'s model for a corpus (:func:`config_for_words`), built once."""
    return spec.build(config_for_words(spec, words, vocab, **overrides))


def splittable() -> list[str]:
    """The registered models that declare a tensor-parallel split (``LanguageModel.split_fn``): what
    ``--model-parallel`` and ``jnnex plan --model`` take."""
    return [name for name, spec in REGISTRY.items() if spec.fit_fn is None and spec.build(spec.config()).split_fn]


def has_manual_backward(name: str) -> bool:
    """Whether the registered model ``name`` has a hand-written backward (``--backward manual``, diagnostics)."""
    spec = get_spec(name)
    return spec.fit_fn is None and spec.build(spec.config()).backward_fn is not None

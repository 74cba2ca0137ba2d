"""The language models of the curriculum, one module each, and the registry that names them.

* :mod:`jnnex.models.bigram`   — the bigram model, counted and learned (makemore part 1)
* :mod:`jnnex.models.mlp_lm`   — the MLP over a window of characters (Bengio et al. 2003; part 2), its backward, the
  init ladder and the lecture's ladder of fixes (part 3)
* :mod:`jnnex.models.bn_mlp`   — MLPs with BatchNorm (parts 3-4) and their backward by hand, layer by layer
* :mod:`jnnex.models.wavenet`  — the WaveNet tree and the same parameters as causal dilated convolutions (part 5)
* :mod:`jnnex.models.rnn`      — makemore.py's RNN and GRU, backprop through time by hand
* :mod:`jnnex.models.bow`      — makemore.py's causal bag of words
* :mod:`jnnex.models.gpt`      — makemore.py's transformer (GPT-2 blocks), every gradient by hand in llm.c's order
* :mod:`jnnex.models.llama`    — the Llama block (RMSNorm, rotary positions, SwiGLU, grouped-query attention), by hand
* :mod:`jnnex.models.flash`    — tiled causal attention (FlashAttention-2), forward and backward by hand
* :mod:`jnnex.models.registry` — :data:`REGISTRY`, :func:`build`: the one place a model declares itself

Every model is a :class:`jnnex.lm.LanguageModel` around one forward; those with a hand-written backward keep it in
their own module, directly under the forward. A run of a model (train, resume, load) is :mod:`jnnex.run`'s.
"""

from jnnex.models.registry import REGISTRY, ModelSpec, build, get_spec

__all__ = ["REGISTRY", "ModelSpec", "build", "get_spec"]

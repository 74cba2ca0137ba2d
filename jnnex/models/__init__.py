"""The language models of the curriculum, one module each, and the registry that names them.

* :mod:`jnnex.models.bigram`   — the bigram model, counted and learned (makemore part 1)
* :mod:`jnnex.models.mlp_lm`   — the MLP over a window of characters (Bengio et al. 2003; part 2) and its backward
* :mod:`jnnex.models.bn_mlp`   — deep MLPs with BatchNorm (part 3) and their backward by hand (part 4)
* :mod:`jnnex.models.registry` — :data:`REGISTRY`, :func:`build`, :func:`load_run`

Every model is a :class:`jnnex.lm.LanguageModel` around one forward; those with a hand-written backward keep it in
their own module, directly under the forward.
"""

from jnnex.models.registry import REGISTRY, ModelSpec, build, get_spec, load_run

__all__ = ["REGISTRY", "ModelSpec", "build", "get_spec", "load_run"]

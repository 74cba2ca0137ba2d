"""Stage 1 — backprop from first principles (micrograd), in three files read in order:

* :mod:`jnnex.micrograd.engine`     — ``Value``: a scalar reverse-mode autograd engine
* :mod:`jnnex.micrograd.nn`         — neurons, layers and MLPs of ``Value`` nodes; micrograd's moons demo
* :mod:`jnnex.micrograd.tensor_mlp` — the same MLP on whole tensors with a hand-written backward, and the moons
  demo as one jitted scan (``jnnex moons``)
"""

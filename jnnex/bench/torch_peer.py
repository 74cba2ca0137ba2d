"""The PyTorch-eager peer of the training benchmark (imported only when torch is installed; never a dependency).

The network is built from the jnnex model's own initial parameters, so both sides run the same arithmetic: embedding
lookup, concatenation, Linear (+ BatchNorm1d, PyTorch's same variance convention) + tanh per hidden layer, the output
Linear (+ BatchNorm1d), cross-entropy, ``backward()``, and a plain SGD update — the lecture's training loop.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from jnnex.lm import LanguageModel
from jnnex.models.bn_mlp import BNMLPParams
from jnnex.models.mlp_lm import MLPParams


def _t(a) -> torch.Tensor:
    return torch.tensor(np.asarray(a, np.float32), requires_grad=True)


def _network(model: LanguageModel):
    """``(parameters, forward(x) -> logits)`` in torch, from ``model``'s initial parameters."""
    import jax

    params, _ = model.init(jax.random.key(0))
    if isinstance(params, MLPParams):
        C, W1, b1, W2, b2 = map(_t, params)

        def forward(x):
            h = torch.tanh(C[x].view(x.shape[0], -1) @ W1 + b1)
            return h @ W2 + b2

        return [C, W1, b1, W2, b2], forward
    if isinstance(params, BNMLPParams):
        cfg = model.cfg
        C = _t(params.C)
        dense = [(_t(layer.W), _t(layer.b) if layer.b is not None else None) for layer in params.dense]
        bn = [(_t(p.gamma), _t(p.beta)) for p in params.bn]
        running = [(torch.zeros(p.gamma.shape[0]), torch.ones(p.gamma.shape[0])) for p in params.bn]  # as jnnex's

        def forward(x):
            h = C[x].view(x.shape[0], -1)
            for i, (W, b) in enumerate(dense):
                h = h @ W if b is None else h @ W + b
                if i < len(bn):
                    h = F.batch_norm(h, *running[i], bn[i][0], bn[i][1], training=True, momentum=cfg.momentum,
                                     eps=cfg.eps)
                if i < cfg.n_layers:
                    h = torch.tanh(h)
            return h

        flat = [C] + [p for W, b in dense for p in (W, b) if p is not None] + [p for g in bn for p in g]
        return flat, forward
    raise NotImplementedError(f"no PyTorch twin of model {model.name!r} is written ({type(params).__name__})")


def make_torch_step(model: LanguageModel, X: np.ndarray, Y: np.ndarray, batch: int, lr: float = 0.1):
    """``steps(n)``: ``n`` training steps of ``model``'s network in PyTorch eager, minibatches drawn with randint."""
    params, forward = _network(model)
    Xt, Yt = torch.from_numpy(np.asarray(X, np.int64)), torch.from_numpy(np.asarray(Y, np.int64))
    gen = torch.Generator().manual_seed(0)

    def steps(n: int) -> float:
        for _ in range(n):
            ix = torch.randint(0, Xt.shape[0], (batch,), generator=gen)
            loss = F.cross_entropy(forward(Xt[ix]), Yt[ix])
            for p in params:
                p.grad = None
            loss.backward()
            with torch.no_grad():
                for p in params:
                    p -= lr * p.grad
        return float(loss.detach())

    return steps

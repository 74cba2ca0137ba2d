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


def make_torch_gpt_step(model: LanguageModel, X: np.ndarray, Y: np.ndarray, batch: int, tcfg):
    """``steps(n)``: ``n`` AdamW steps of the same GPT in PyTorch eager (makemore.py's ``Transformer``: attention
    written out, as there), from ``model``'s initial parameters, minibatches drawn with randint. On the GPU when JAX
    runs on one (and torch sees it), else on the CPU: the peer always runs where jnnex does."""
    import jax

    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    params, _ = model.init(jax.random.key(0))
    cfg = model.cfg
    C, nh = cfg.n_embd, cfg.n_head

    def t(a):
        return torch.tensor(np.asarray(a, np.float32), device=device, requires_grad=True)

    wte, wpe, lnf_w, lnf_b, head = t(params.wte), t(params.wpe), t(params.lnf.w), t(params.lnf.b), t(params.lm_head)
    blocks = [[t(a) for a in jax.tree.leaves(b)] for b in params.blocks]  # ln1 w b, qkv W b, attproj W b, ln2 w b, …
    flat = [wte, wpe, *(p for b in blocks for p in b), lnf_w, lnf_b, head]

    def forward(x):
        B, T = x.shape
        mask = torch.tril(torch.ones(T, T, dtype=torch.bool, device=device))
        h = wte[x] + wpe[:T]
        for ln1w, ln1b, qkvW, qkvb, projW, projb, ln2w, ln2b, fcW, fcb, fcprojW, fcprojb in blocks:
            a = F.layer_norm(h, (C,), ln1w, ln1b, 1e-5) @ qkvW + qkvb
            q, k, v = (z.view(B, T, nh, C // nh).transpose(1, 2) for z in a.split(C, dim=2))
            att = (q @ k.transpose(-2, -1)) * (C // nh) ** -0.5
            att = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
            h = h + (att @ v).transpose(1, 2).reshape(B, T, C) @ projW + projb
            m = F.gelu(F.layer_norm(h, (C,), ln2w, ln2b, 1e-5) @ fcW + fcb, approximate="tanh")
            h = h + m @ fcprojW + fcprojb
        return F.layer_norm(h, (C,), lnf_w, lnf_b, 1e-5) @ head

    opt = torch.optim.AdamW(flat, lr=tcfg.lr, betas=tuple(tcfg.betas), eps=tcfg.adam_eps,
                            weight_decay=tcfg.weight_decay)
    Xt = torch.from_numpy(np.asarray(X, np.int64)).to(device)
    Yt = torch.from_numpy(np.asarray(Y, np.int64)).to(device)
    gen = torch.Generator(device=device).manual_seed(0)

    def steps(n: int) -> float:
        for _ in range(n):
            ix = torch.randint(0, Xt.shape[0], (batch,), generator=gen, device=device)
            logits = forward(Xt[ix])
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), Yt[ix].view(-1), ignore_index=-1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    return steps


def make_torch_nanogpt_step(model: LanguageModel, tokens: np.ndarray, batch: int, tcfg):
    """``steps(n)``: ``n`` steps of nanoGPT's Shakespeare recipe in PyTorch eager, written as nanoGPT's ``model.py``
    computes it (no biases, the head tied to the token table, ``F.scaled_dot_product_attention`` causal, tanh GELU),
    from ``model``'s initial parameters: windows of ``block_size + 1`` tokens at random offsets, AdamW (weight decay
    on the matrices only) at ``tcfg``'s learning rate for the step (jnnex's own schedule: nanoGPT's warmup and
    cosine), gradients clipped to norm ``tcfg.grad_clip``. On the CPU (or the GPU, as JAX). ``steps.forward(x)``:
    the logits of rows ``x`` (a ``torch`` tensor of token ids), for an estimate under ``torch.no_grad()``."""
    import jax

    from jnnex.optim import lr_schedule

    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    params, _ = model.init(jax.random.key(0))
    cfg = model.cfg
    if cfg.bias or not cfg.tie:
        raise ValueError("the nanoGPT peer is nanoGPT's layout: bias=False, tie=True")
    C, nh, T = cfg.n_embd, cfg.n_head, cfg.block_size

    def t(a):
        return torch.tensor(np.asarray(a, np.float32), device=device, requires_grad=True)

    wte, wpe, lnf_w = t(params.wte), t(params.wpe), t(params.lnf.w)
    blocks = [(t(b.ln1.w), t(b.qkv.W), t(b.attproj.W), t(b.ln2.w), t(b.fc.W), t(b.fcproj.W)) for b in params.blocks]
    matrices = [wte, wpe, *(p for b in blocks for p in (b[1], b[2], b[4], b[5]))]
    gains = [lnf_w, *(p for b in blocks for p in (b[0], b[3]))]

    def forward(x):
        B = x.shape[0]
        h = wte[x] + wpe[:T]
        for ln1w, qkvW, projW, ln2w, fcW, fcprojW in blocks:
            q, k, v = (F.layer_norm(h, (C,), ln1w, None, 1e-5) @ qkvW).split(C, dim=2)
            q, k, v = (z.view(B, T, nh, C // nh).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + y.transpose(1, 2).reshape(B, T, C) @ projW
            h = h + F.gelu(F.layer_norm(h, (C,), ln2w, None, 1e-5) @ fcW, approximate="tanh") @ fcprojW
        return F.layer_norm(h, (C,), lnf_w, None, 1e-5) @ wte.T

    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": tcfg.weight_decay},
                             {"params": gains, "weight_decay": 0.0}], lr=tcfg.lr, betas=tuple(tcfg.betas),
                            eps=tcfg.adam_eps)
    data = torch.from_numpy(np.asarray(tokens, np.int64)).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    offsets = torch.arange(T + 1, device=device)

    rates = np.asarray(jax.jit(jax.vmap(lr_schedule(tcfg)))(np.arange(tcfg.steps + 1)), np.float64)
    done = [0]  # steps taken, across calls: where the schedule is

    def steps(n: int) -> float:
        for _ in range(n):
            for group in opt.param_groups:
                group["lr"] = float(rates[min(done[0], len(rates) - 1)])
            done[0] += 1
            ix = torch.randint(0, len(data) - T, (batch,), generator=gen, device=device)
            rows = data[ix[:, None] + offsets]
            logits = forward(rows[:, :-1])
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([*matrices, *gains], tcfg.grad_clip)
            opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    steps.forward = forward
    return steps

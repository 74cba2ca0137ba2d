# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lesson 11 — past tensor parallelism: pipeline stages, experts, a ring
#
# **What you will learn**: the three ways large models split what tensor parallelism does not. **Pipeline
# parallelism** cuts the blocks into stages and the batch into micro-batches, and a schedule says who works when —
# you will write the schedules, draw their bubbles, replay them as one lockstep program and accumulate a
# pipeline's gradients by hand. **A mixture of experts** gives each token a few of many MLPs, chosen by a router;
# you will route tokens, count each expert's load and watch the balancing loss even it out. **Ring attention**
# splits a long sequence over devices and passes the keys and values round a ring; you will run the ring with the
# online softmax and see why the chunks are striped.
# Each mechanism is written on the page first, then shown equal to jnnex's.
#
# Code: `jnnex/pipeline.py`, `jnnex/models/moe.py`, `jnnex/expert_parallel.py`, `jnnex/models/ring.py`. Background:
# GPipe (Huang et al. 2019), PipeDream-Flush / 1F1B (Narayanan et al. 2021), Switch Transformers (Fedus et al. 2021),
# Ring Attention (Liu et al. 2023), striped attention (Brandon et al. 2023). No GPU needed: 4 *forced* CPU devices.
# **Full size** (`python lessons/11_pipelines_experts_rings.py`, 2 cores, 114 s measured): the page's schedules
# are jnnex's tick for tick, bubble 0.2727 = (P − 1)/(M + P − 1) at P = 4, M = 8, stage 0 holding 8 micro-batches
# under GPipe and 4 under 1F1B; with a backward twice a forward, in lockstep 1F1B idles 0.4000 and the alternating
# schedule 0.2727 (holding 7), and 1F1B with its backward in two ticks 0.2727 (holding 4); the page's
# micro-batched gradients and jnnex's 4-stage 1F1B equal the whole batch's to 1.1e-16 in float64; the page's router
# gives jnnex's balancing loss exactly; after 600 steps the busiest expert takes 2.82× the mean load without the
# balancing loss and 1.10× with it (dev 2.2342 against 2.2444); the page's ring and jnnex's equal plain causal
# attention to 4.4e-16, the busiest device doing 1.05× the mean work striped, 1.74× contiguous.

# %%
import jax

jax.config.update("jax_num_cpu_devices", 4)  # before anything runs: 4 CPU devices
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jnnex import learn, pipeline  # noqa: E402
from jnnex.check import randomise  # noqa: E402
from jnnex.data import Vocab, make_splits  # noqa: E402
from jnnex.layers import cross_entropy_backward, cross_entropy_forward  # noqa: E402
from jnnex.lm import manual_gradients, merge_grads  # noqa: E402
from jnnex.models import gpt as G, moe, ring  # noqa: E402
from jnnex.models.registry import REGISTRY, build_for_words  # noqa: E402
from jnnex.optim import TrainConfig  # noqa: E402
from jnnex.train import fit  # noqa: E402

plt = learn.pyplot()
words, source = learn.names()
vocab = Vocab.from_words(words)
STEPS = learn.pick(600, 20)


def max_gap(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# %% [markdown]
# ## 1. A schedule is a table
#
# `P` stages, `M` micro-batches. A stage can run the forward of micro-batch `m` once the previous stage has sent it,
# and its backward once it has run the forward and the next stage has sent the gradient back. Give each stage an
# *order* of work and let every stage, at every clock tick, do its next action if it can — that is the whole
# simulation. **GPipe**: every forward, then every backward. **1F1B**: stage `s` warms up with `P − 1 − s` forwards,
# then alternates one forward and one backward, then drains.

# %%
def gpipe_orders(P, M):
    return [[("F", m) for m in range(M)] + [("B", m) for m in range(M)] for _ in range(P)]


def one_f_one_b_orders(P, M, warm_up=None):  # (warm_up(s): another warm-up, for section 1b)
    orders = []
    for s in range(P):
        warm = min(P - 1 - s if warm_up is None else warm_up(s), M)
        order = [("F", m) for m in range(warm)]
        for i in range(M - warm):
            order += [("F", warm + i), ("B", i)]
        orders.append(order + [("B", m) for m in range(M - warm, M)])
    return orders


def needs(kind, s, m, P):  # a forward waits for the previous stage's; a backward for its forward and the next's
    if kind == "F":
        return [("F", s - 1, m)] if s > 0 else []
    return [("F", s, m)] + ([("B", s + 1, m)] if s < P - 1 else [])


def simulate(orders, P, alternate=False, needs=needs):  # (alternate, and other needs: section 1b)
    done, pos, table = {}, [0] * P, []
    while any(pos[s] < len(orders[s]) for s in range(P)):
        t, row = len(table), []
        for s in range(P):
            if pos[s] == len(orders[s]):
                row.append(None)
                continue
            kind, m = orders[s][pos[s]]
            turn = not alternate or (t % 2 == 0) == (kind == "F")
            row.append((kind, m) if turn and all(done.get(n, t) < t for n in needs(kind, s, m, P)) else None)
        for s, a in enumerate(row):
            if a is not None:
                done[(a[0], s, a[1])] = t
                pos[s] += 1
        table.append(tuple(row))
    return tuple(table)


Pn, M = 4, 8
tables = {"gpipe": simulate(gpipe_orders(Pn, M), Pn), "1f1b": simulate(one_f_one_b_orders(Pn, M), Pn)}
same_tables = all(tables[k] == pipeline.schedule(k, Pn, M).table for k in tables)
bubbles = {k: 1 - sum(a is not None for row in t for a in row) / (len(t) * Pn) for k, t in tables.items()}


def held(table, s):  # micro-batches whose activations stage s keeps at once (from its forward to its backward)
    tick = {a: t for t, row in enumerate(table) for a in [row[s]] if a}
    return max(sum(tick[("F", m)] <= t <= tick[("B", m)] for m in range(M)) for t in range(len(table)))


print(f"the page's tables are jnnex's: {same_tables}; bubble {bubbles} against (P - 1)/(M + P - 1) = "
      f"{(Pn - 1) / (M + Pn - 1):.4f}; stage 0 holds {held(tables['gpipe'], 0)} micro-batches under GPipe, "
      f"{held(tables['1f1b'], 0)} under 1F1B")
fig, axes = plt.subplots(2, 1, figsize=(9, 3.6), sharex=True)
for ax, (name, table) in zip(axes, tables.items()):
    for t, row in enumerate(table):
        for s, a in enumerate(row):
            if a is not None:
                ax.barh(s, 1, left=t, color="tab:blue" if a[0] == "F" else "tab:orange", edgecolor="white")
                ax.text(t + 0.5, s, f"{a[0]}{a[1]}", ha="center", va="center", fontsize=7, color="white")
    ax.set(title=f"{name}: bubble {bubbles[name]:.3f}", xlabel="tick", ylabel="stage", yticks=range(Pn))
    ax.invert_yaxis()
fig.tight_layout()
learn.show(fig, "11-pipeline-timelines")

# %% [markdown]
# ## 1b. One program in lockstep
#
# The tick bubble counts every tick as equally long. Give the actions times — a forward `F`, a backward `B`, here
# twice as long — and replay the table two ways. **Each device its own program** (Megatron-LM's processes): a stage
# starts its next action as soon as it is free and its input has arrived. **One SPMD program** (jnnex's): every tick
# ends in a `ppermute` with the neighbouring stages, so a device leaves tick `t` only when it and its neighbours have
# finished their work of tick `t`. 1F1B's steady state pairs one stage's forward with its neighbour's backward, so in
# lockstep each of those ticks lasts a backward.
#
# The fix is a table whose ticks are all forwards or all backwards: `simulate(..., alternate=True)` lets forwards run
# only at even ticks and backwards only at odd ones, and 1F1B's order warms up longer, `2 (P − 1 − s)` forwards, so
# that stage `s` runs `2 (P − 1 − s) + 1` before its first backward — the ticks a micro-batch needs to reach the last
# stage and come back. A tick where no stage works takes no time.

# %%
def replay(table, F, B, lockstep, needs=needs):
    P, end = len(table[0]), {}
    free, busy = [0.0] * P, 0.0
    for row in table:
        reached = list(free)
        for s, a in enumerate(row):
            if a is None:
                continue
            kind, m = a
            start = max([free[s]] + [end[n] for n in needs(kind, s, m, P)])
            end[(kind, s, m)] = reached[s] = start + (F if kind == "F" else B)
            busy += F if kind == "F" else B
        free = [max(reached[max(s - 1, 0):s + 2]) for s in range(P)] if lockstep else reached
    return 1 - busy / (P * max(free))


tables["alternating"] = simulate(one_f_one_b_orders(Pn, M, lambda s: 2 * (Pn - 1 - s)), Pn, alternate=True)
same_alternating = tables["alternating"] == pipeline.schedule("alternating", Pn, M).table
lockstep = {name: {mode: replay(t, 1.0, 2.0, mode == "lockstep") for mode in ("own programs", "lockstep")}
            for name, t in tables.items()}
jnnex_lockstep = {name: 1 - sum(b) / (Pn * mk) for name in tables
                  for mk, b in [pipeline.schedule(name, Pn, M).replay([1.0] * Pn, [2.0] * Pn, lockstep=True)]}
formula = (Pn - 1) / (M + Pn - 1)
excess = {name: {mode: b - formula for mode, b in by_mode.items()} for name, by_mode in lockstep.items()}
lockstep_gap = max(abs(lockstep[name]["lockstep"] - jnnex_lockstep[name]) for name in tables)
print(f"the page's alternating table is jnnex's: {same_alternating}; stage 0 holds "
      f"{held(tables['alternating'], 0)} micro-batches")
for name, by_mode in lockstep.items():
    print(f"{name:12s} bubble with B = 2F: " + ", ".join(f"{k} {v:.4f}" for k, v in by_mode.items())
          + f" (jnnex's replay in lockstep: {jnnex_lockstep[name]:.4f})")
print(pipeline.schedule("alternating", Pn, M).draw())

# %% [markdown]
# The alternating schedule pays for its bubble with `2P − 1` micro-batches held. The other way to even the ticks
# keeps 1F1B's memory: cut each backward in two ticks of half the stage's blocks — `B`, the last half first, then
# `b`. The previous stage now waits for `b`. With a backward twice a forward, every tick lasts a forward's time, and
# lockstep costs nothing (jnnex's `--pipeline-schedule 1f1b/2`).

# %%
def halves(orders):  # each backward in two ticks: "B" the stage's last half of its blocks, then "b" the first
    return [[x for a in order for x in ([a] if a[0] == "F" else [("B", a[1]), ("b", a[1])])] for order in orders]


def needs_halves(kind, s, m, P):
    if kind == "b":
        return [("B", s, m)]
    if kind == "B":
        return [("F", s, m)] + ([("b", s + 1, m)] if s < P - 1 else [])
    return needs(kind, s, m, P)


tables["1f1b/2"] = simulate(halves(one_f_one_b_orders(Pn, M)), Pn, needs=needs_halves)
as_jnnex = tuple(tuple(None if a is None else ("B" if a[0] == "b" else a[0], a[1]) for a in row)
                 for row in tables["1f1b/2"])
same_halves = as_jnnex == pipeline.schedule("1f1b", Pn, M, parts=2).table
halves_bubble = {mode: replay(tables["1f1b/2"], 1.0, 1.0, mode == "lockstep", needs_halves)  # (each half: B/2 = F)
                 for mode in ("own programs", "lockstep")}
held_halves = held(tuple(tuple(None if a is None or a[0] == "B" else ("B", a[1]) if a[0] == "b" else a for a in row)
                         for row in tables["1f1b/2"]), 0)  # (held until the backward's second tick)
print(f"1f1b/2: the page's table is jnnex's: {same_halves}; bubble with B = 2F: "
      + ", ".join(f"{k} {v:.4f}" for k, v in halves_bubble.items()) + f"; stage 0 holds {held_halves}")

# %% [markdown]
# ## 2. A pipeline's gradient, by hand
#
# The stages are slices of the model's own blocks. Run the micro-batches through them in GPipe's order on one
# device: each micro-batch's forward keeps its caches, each backward starts from its own loss — weighted by its
# share of the batch's targets, so the sum is the gradient of the batch's mean — and the gradients add up. That
# equals the whole batch's gradient; jnnex's pipeline does the same across 4 devices, sending the activations and
# gradients with `ppermute`.

# %%
model = build_for_words(REGISTRY["gpt"], words, vocab, n_layer=4, n_embd=32, n_head=4)
splits = make_splits(words, model.block_size, vocab=vocab, per_position=True)
params = randomise(model.init(jax.random.key(0))[0], jax.random.key(1), jnp.float64)
x, y = (jnp.asarray(a[:16]) for a in splits.train)
cfg, pipe = model.cfg, model.pipe


def page_pipeline_grads(params, x, y, stages, micro):
    per_stage = cfg.n_layer // stages
    n = (y >= 0).sum()
    grads, loss = None, 0.0
    for xm, ym in zip(jnp.split(x, micro), jnp.split(y, micro)):
        h, c_emb = pipe.embed_forward(cfg, params, xm, True)
        caches = []  # forward: stage after stage, each its blocks
        for s in range(stages):
            for i in range(s * per_stage, (s + 1) * per_stage):
                h, c = pipe.block_forward(cfg, params.blocks[i], h, i, train=True)
                caches.append(c)
        logits, c_top = pipe.top_forward(cfg, params, h)
        loss_m, c_ce = cross_entropy_forward(logits, ym)
        share = (ym >= 0).sum() / n  # this micro-batch's part of the batch's mean
        dh, g_top = pipe.top_backward(cfg, cross_entropy_backward(share, c_ce)[0], c_top)
        dblocks = [None] * cfg.n_layer
        for i in reversed(range(cfg.n_layer)):  # backward: the stages in reverse
            dh, dblocks[i] = pipe.block_backward(dh, caches[i])
        g = params._replace(blocks=tuple(dblocks), **merge_grads(pipe.embed_backward(cfg, dh, c_emb), g_top))
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        loss = loss + share * loss_m
    return loss, grads


whole = manual_gradients(model, params, (), x, y)
page_loss, page_grads = page_pipeline_grads(params, x, y, stages=4, micro=4)
page_pipeline_gap = max_gap(page_grads, whole.grads)
mesh = pipeline.mesh_3d(1, 4, 1)
jnnex_loss, jnnex_grads = jax.jit(pipeline.pipeline_value_and_grad(model, mesh, pipeline.schedule("1f1b", 4, 4),
                                                                   params))(pipeline.stack_blocks(params), x, y)
jnnex_pipeline_gap = max_gap(pipeline.unstack_blocks(jnnex_grads, cfg.n_layer), whole.grads)
print(f"the page's 4 micro-batches vs the whole batch: gradients differ by at most {page_pipeline_gap:.1e}; jnnex's "
      f"1F1B on 4 stages (4 devices): {jnnex_pipeline_gap:.1e}")

# %% [markdown]
# ## 3. Routing tokens to experts
#
# A router scores each token against each of `E` experts (`logits = x W_router`); the token goes to its `k` best,
# weighted by the softmax of their scores. Left alone, routers tend to send most tokens to a few experts. Switch's
# **balancing loss** counts it: `f_e`, the fraction of the choices expert `e` got, times `P_e`, the router's mean
# probability for it, summed and scaled by `E` — 1 when the load is even, up to `E` when one expert takes all.

# %%
def page_route(x, W_router, k):
    logits = x @ W_router
    top = jnp.argsort(-logits, axis=-1, stable=True)[:, :k]  # ties to the lower index, as jax.lax.top_k
    chosen = jax.nn.one_hot(top, W_router.shape[1]).sum(1)  # (N, E)
    load = chosen.mean(0) / k  # f_e, sums to 1
    probs = jax.nn.softmax(logits, axis=-1).mean(0)  # P_e
    return load, W_router.shape[1] * (load * probs).sum()


E, k = 8, 2
kx = jax.random.split(jax.random.key(2), 4)
xt = jax.random.normal(kx[0], (64, 16))
W_router = jax.random.normal(kx[1], (16, E)) * 0.5
page_load, page_aux = page_route(xt, W_router, k)
W1, W2 = jax.random.normal(kx[2], (E, 16, 8)) * 0.25, jax.random.normal(kx[3], (E, 8, 16)) * 0.35
(_, jnnex_aux), _ = moe.moe_forward(xt, W_router, W1, W2, k)
aux_gap = abs(float(page_aux - jnnex_aux))
print(f"the page's balancing loss {float(page_aux):.6f}, jnnex's {float(jnnex_aux):.6f}; load per expert "
      f"{np.round(np.asarray(page_load), 3)}")

# %% [markdown]
# Now train the Llama with 8 experts, top-2, on the names — once without the balancing loss and once with it (a
# large weight, 0.5, so a short run shows it) — and measure each expert's share of the choices in the first block
# on the validation words. Whatever the numbers say is what the balancing loss did here.

# %%
loads, devs = {}, {}
for label, weight in (("no balancing loss", 0.0), ("aux_weight 0.5", 0.5)):
    llama = build_for_words(REGISTRY["llama"], words, vocab, n_layer=learn.pick(2, 1), n_embd=32, n_head=4, n_kv_head=2,
                            n_expert=E, expert_top_k=k, aux_weight=weight)
    tcfg = TrainConfig(steps=STEPS, eval_every=STEPS, chunk=min(STEPS, 200), batch_size=32, optimizer="adamw",
                       lr=3e-3)
    result = fit(llama, splits, tcfg)
    xv = jnp.asarray(splits.dev[0][:256])
    out = llama.forward(result.ts.params, (), xv, train=False)
    loads[label] = np.asarray(out.caches.blocks[0].moe[3])  # f_e of the first block: the MoE layer's own count
    devs[label] = result.evals[-1]["dev_loss"]
spread = {label: float(f.max() / f.mean()) for label, f in loads.items()}  # 1: perfectly even
print("the busiest expert's load over the mean: " + ", ".join(f"{k_}: {v:.2f}" for k_, v in spread.items())
      + "; dev loss: " + ", ".join(f"{k_}: {v:.4f}" for k_, v in devs.items()))
fig, ax = plt.subplots(figsize=(6, 3))
for i, (label, f) in enumerate(loads.items()):
    ax.bar(np.arange(E) + 0.4 * i - 0.2, f, width=0.4, label=label)
ax.axhline(1 / E, color="0.3", ls=":", label="even: 1/E")
ax.set(title=f"first block's load per expert after {STEPS} steps (validation words)", xlabel="expert",
       ylabel="share of the choices")
ax.legend(fontsize=8)
learn.show(fig, "11-expert-load")

# %% [markdown]
# ## 4. The ring
#
# Split the sequence over `n` devices. Each keeps its own queries and passes its keys and values to the next device,
# `n − 1` times; every device folds each chunk it receives into its output with the online softmax of the tiled
# attention (a running maximum `m`, a running sum `l`, a running output, rescaled as the maximum grows). With
# **contiguous** chunks the causal mask idles the first device and loads the last; **striped** chunks — device `d`
# holds positions `d, d + n, d + 2n, …` — give every device about the same work. Below, the `n` devices are a Python
# loop on one device.

# %%
def page_ring(q, k, v, n):
    B, nh, T, hs = q.shape
    pos = jnp.arange(T).reshape(T // n, n).T  # pos[d]: the positions device d holds (striped)
    out = []
    for d in range(n):
        qd = q[:, :, pos[d]]
        m = jnp.full((B, nh, T // n, 1), -jnp.inf)
        l = jnp.zeros((B, nh, T // n, 1))
        o = jnp.zeros_like(qd)
        for step in range(n):  # at step s, device d holds the chunk of device d - s
            src = (d - step) % n
            scores = qd @ jnp.swapaxes(k[:, :, pos[src]], -1, -2) * hs**-0.5
            scores = jnp.where(pos[src][None, :] <= pos[d][:, None], scores, -jnp.inf)
            m_new = jnp.maximum(m, scores.max(-1, keepdims=True))
            p = jnp.exp(scores - m_new)
            l = l * jnp.exp(m - m_new) + p.sum(-1, keepdims=True)
            o = o * jnp.exp(m - m_new) + p @ v[:, :, pos[src]]
            m = m_new
        out.append(o / l)
    y = jnp.zeros_like(q)
    for d in range(n):
        y = y.at[:, :, pos[d]].set(out[d])
    return y


n, T = 4, learn.pick(64, 16)
kq = jax.random.split(jax.random.key(3), 3)
q, kk, v = (jax.random.normal(kk_, (1, 2, T, 8)) for kk_ in kq)
plain = G.heads(G.attend_forward(q, kk, v)[0], 2)
page_ring_gap = float(jnp.max(jnp.abs(page_ring(q, kk, v, n) - plain)))
seq_mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("seq",))
spec = P(None, None, "seq", None)
ring_fn = jax.jit(jax.shard_map(lambda q, k, v: ring.ring_attention_forward(q, k, v, "seq")[0], mesh=seq_mesh,
                                in_specs=(spec,) * 3, out_specs=spec))
jnnex_ring = ring.unstripe(ring_fn(*(ring.stripe(a, n) for a in (q, kk, v))), n)
jnnex_ring_gap = float(jnp.max(jnp.abs(jnnex_ring - plain)))
# the work: the score entries the causal mask keeps, per device, striped against contiguous chunks
t = np.arange(T)
kept = {"striped": [int((t[d::n][:, None] >= t[None, :]).sum()) for d in range(n)],
        "contiguous": [int((t[d * T // n:(d + 1) * T // n][:, None] >= t[None, :]).sum()) for d in range(n)]}
balance = {k_: max(w) / (sum(w) / n) for k_, w in kept.items()}  # the busiest device over the mean: 1 is even
print(f"the page's ring vs plain causal attention: {page_ring_gap:.1e}; jnnex's ring on {n} devices: "
      f"{jnnex_ring_gap:.1e}; the busiest device's work over the mean: striped {balance['striped']:.3f}, "
      f"contiguous {balance['contiguous']:.3f}")
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
held_chunk = np.array([[(d - s) % n for s in range(n)] for d in range(n)])
axes[0].imshow(held_chunk, cmap="tab10", vmin=0, vmax=9)
for d in range(n):
    for s in range(n):
        axes[0].text(s, d, str(held_chunk[d, s]), ha="center", va="center", color="white")
axes[0].set(title="whose keys and values device d holds at step s", xlabel="step s", ylabel="device d",
            xticks=range(n), yticks=range(n))
for i, (label, w) in enumerate(kept.items()):
    axes[1].bar(np.arange(n) + 0.4 * i - 0.2, w, width=0.4, label=label)
axes[1].set(title="score entries the causal mask keeps", xlabel="device", ylabel="entries")
axes[1].legend(fontsize=8)
learn.show(fig, "11-ring")

# %% [markdown]
# ## What to try next
#
# * `jnnex train --model gpt --devices 8 --stages 2 --model-parallel 2 --micro-batches 2` (with
#   `JAX_NUM_CPU_DEVICES=8`): data × stage × model, the same run as one device.
# * `jnnex plan --model llama --preset mixtral-8x7b --vocab-size 32000 --devices 8`: the experts on paper.
# * `jnnex bench --only pipeline`: the bubble replayed with measured stage times, as jnnex's host-driven runtime
#   runs a schedule (`pipeline.host_value_and_grad`: each stage's programs on its own device) and in lockstep, and
#   each schedule's memory against GPipe's.

# %%
learn.result(same_tables=same_tables, same_alternating=same_alternating, excess=excess, lockstep_gap=lockstep_gap,
             same_halves=same_halves, halves_excess={k: v - formula for k, v in halves_bubble.items()},
             held_halves=held_halves,
             held_alternating=held(tables["alternating"], 0),
             bubble_gpipe=bubbles["gpipe"], bubble_1f1b=bubbles["1f1b"],
             bubble_formula=(Pn - 1) / (M + Pn - 1), held_gpipe=held(tables["gpipe"], 0),
             held_1f1b=held(tables["1f1b"], 0), page_pipeline_gap=page_pipeline_gap,
             jnnex_pipeline_gap=jnnex_pipeline_gap, page_loss_gap=abs(float(page_loss - whole.loss)),
             aux_gap=aux_gap, load_sum=float(page_load.sum()), spread=spread, devs=devs,
             page_ring_gap=page_ring_gap, jnnex_ring_gap=jnnex_ring_gap, balance=balance, steps=STEPS)

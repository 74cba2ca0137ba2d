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
# # Lesson 10 — many devices: data parallel, the `pmean` pitfall, sharded parameters, split layers
#
# **What you will learn**: how one training step runs on several devices — each on its share of the batch, the
# gradients summed (data parallelism) — written two ways: the *global view*, where XLA partitions the unchanged step,
# and the *explicit view* under `jax.shard_map`, where you write the communication; the classic mistake of averaging
# per-device gradients; and the two ways past one device's memory — splitting the parameters (FSDP) and splitting
# each layer (Megatron's tensor parallelism).
#
# Code: `jnnex/parallel.py`, `jnnex/tensor_parallel.py`. Background: the JAX sharding tutorial
# (<https://docs.jax.dev/en/latest/sharded-computation.html>), Megatron-LM (Shoeybi et al. 2019).
# No GPU needed: JAX splits this CPU into 4 *forced* devices (they share the cores, so nothing gets faster — the
# point is the arithmetic). **Full size** (`python lessons/10_many_devices.py`, 2 cores, 35 s measured): data
# parallel on 4 devices equals one device to 1.1e-16 in float64, and so does the explicit `shard_map` step; the
# pitfall is 4.000000× off; FSDP keeps 0.250 of the GPT's state on each device, tensor parallel 0.55; 2,000 AdamW
# steps on the 2 × 2 split end at dev 2.21302, one device's to every printed digit.

# %%
import jax

jax.config.update("jax_num_cpu_devices", 4)  # before anything runs: 4 CPU devices
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

from jnnex import learn, parallel, tensor_parallel  # noqa: E402
from jnnex.check import randomise  # noqa: E402
from jnnex.data import Vocab, make_splits  # noqa: E402
from jnnex.layout import Parallel  # noqa: E402
from jnnex.models.registry import REGISTRY, build_for_words  # noqa: E402
from jnnex.optim import TrainConfig, make_optimizer  # noqa: E402
from jnnex.train import fit, init_train_state, make_step  # noqa: E402

plt = learn.pyplot()
words, source = learn.names()
vocab = Vocab.from_words(words)
STEPS = learn.pick(2_000, 20)
print(jax.devices())

# %% [markdown]
# ## 1. The global view: the same step, the batch split
#
# Put the batch on a mesh of 4 devices, split along its rows, and the parameters whole on each; call the *same* jitted
# function. XLA gives each device its 8 rows and turns the gradient's sum over the batch into an all-reduce.

# %%
model = build_for_words(REGISTRY["gpt"], words, vocab, n_layer=learn.pick(2, 1), n_embd=32, n_head=4)
splits = make_splits(words, model.block_size, vocab=vocab, per_position=True)
params = randomise(model.init(jax.random.key(0))[0], jax.random.key(1), jnp.float64)
x, y = (jnp.asarray(a[:32]) for a in splits.train)
step = jax.jit(model.value_and_grad)
loss1, g1, _ = step(params, (), x, y)
mesh = parallel.data_mesh(4)
x4, y4 = (jax.device_put(a, parallel.batch_sharded(mesh)) for a in (x, y))
loss4, g4, _ = step(jax.device_put(params, parallel.replicated(mesh)), (), x4, y4)
dp_gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)))
print(f"x is split as {[s.data.shape for s in x4.addressable_shards]}; gradients differ by at most {dp_gap:.1e}")

# %% [markdown]
# ## 2. The explicit view, and the pitfall
#
# Under `shard_map` each device sees its 8 rows and the whole parameters. The tempting step — each device's
# `jax.grad` of its own loss, then `pmean` across devices — is **4 times** too large: autodiff already sums the
# gradient of a replicated input over the devices. (The right way, `parallel.explicit_step`, differentiates the
# globally reduced loss.)

# %%
# (on the MLP of lesson 3: every device's rows hold the same number of targets, so the factor is exactly 4)
mlp = build_for_words(REGISTRY["mlp"], words, vocab)
mx, my = (jnp.asarray(a[:32]) for a in make_splits(words, 3, vocab=vocab).train)
mparams = randomise(mlp.init(jax.random.key(0))[0], jax.random.key(1), jnp.float64)
from jax.sharding import PartitionSpec as P  # noqa: E402


def pitfall(p, x, y):  # under shard_map: x, y are this device's 8 rows; p is whole on every device
    g = jax.grad(lambda p: mlp.objective(p, (), x, y)[0])(p)  # the gradient of this device's own loss ...
    return jax.lax.pmean(g, "data")  # ... averaged over the devices: the tempting step


def right(p, x, y):
    n_local = (y >= 0).sum()
    n = jax.lax.psum(n_local, "data")  # the targets of the whole batch

    def global_loss(p):  # the whole batch's mean loss: each device's mean, weighted by its share, summed
        return jax.lax.psum(mlp.objective(p, (), x, y)[0] * n_local / n, "data")

    return jax.grad(global_loss)(p)  # replicated p: autodiff sums its cotangent over the devices itself


specs = dict(mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P())
wrong = jax.jit(jax.shard_map(pitfall, **specs))(mparams, mx, my)
done_right = jax.jit(jax.shard_map(right, **specs))(mparams, mx, my)
true = jax.grad(lambda p: mlp.objective(p, (), mx, my)[0])(mparams)
norm = lambda tree: float(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(tree))))  # noqa: E731
ratio = norm(wrong) / norm(true)
right_gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(done_right), jax.tree.leaves(true)))
lib_wrong = jax.jit(parallel.pitfall_step_gradients(mlp, mesh))(mparams, (), mx, my)  # jnnex keeps the mistake too
print(f"‖pmean of per-device grads‖ ÷ ‖the true gradient‖: {ratio:.6f} (jnnex's pitfall_step_gradients: "
      f"{norm(lib_wrong) / norm(true):.6f}); the right step, written above, vs jax.grad on one device: {right_gap:.1e}")

# The right way, written out: each device's local loss weighted by its share of the targets, psum-ed; one SGD step
sgd = make_optimizer(TrainConfig(optimizer="sgd", lr=0.1))
ts_m = init_train_state(mlp, sgd, jax.random.key(0))._replace(params=mparams)
explicit = jax.jit(parallel.explicit_step(mlp, sgd, mesh))(ts_m, (mx, my), jax.random.key(0))[0]
global_view = jax.jit(make_step(mlp, sgd))(ts_m, (mx, my), jax.random.key(0))[0]
explicit_gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(explicit.params),
                                                                   jax.tree.leaves(global_view.params)))
print(f"explicit shard_map step vs the global view: parameters differ by at most {explicit_gap:.1e}")

# %% [markdown]
# ## 3. Past one device's memory
#
# * **FSDP** (`fit(..., parallel=Parallel("fsdp", 4))`): every parameter and its optimiser state split 4 ways,
#   gathered whole only inside the step.
# * **Tensor parallelism** (`fit(..., parallel=Parallel("tp", 4, 2))`): every block's heads and MLP split over 2
#   devices — the model's own block, its linears column- and row-parallel, the all-reduces of the backward written by
#   hand (`jnnex/collectives.py`) — the batch over the other 2.
#
# Both give the training of one device (float64 rounding apart). The bytes each device holds:

# %%
jax.config.update("jax_enable_x64", False)
opt = make_optimizer(TrainConfig(optimizer="adamw"))
ts = init_train_state(model, opt, jax.random.key(0))
held = {"one device": parallel.bytes_per_device((ts.params, ts.opt_state))}
p_split, o_split = parallel.fsdp_shardings((ts.params, ts.opt_state), mesh)
held["FSDP over 4"] = parallel.bytes_per_device(parallel.place(parallel.local((ts.params, ts.opt_state)),
                                                               (p_split, o_split)))
tp_mesh = tensor_parallel.mesh_2d(2, 2)
there, _, layout = tensor_parallel.train_layout(model, opt, tp_mesh, ts)
placed = parallel.place(there(parallel.local(ts)), layout)
held["TP 2 x 2"] = parallel.bytes_per_device((placed.params, placed.opt_state))
per_device = {k: max(v.values()) / 1024 for k, v in held.items()}
fig, ax = plt.subplots(figsize=(5, 3.5))
ax.bar(list(per_device), list(per_device.values()), color=["0.6", "tab:blue", "tab:orange"])
ax.set(title="parameters + AdamW state, the fullest device", xlabel="layout", ylabel="KiB per device")
learn.show(fig, "10-bytes-per-device")

tcfg = TrainConfig(steps=STEPS, eval_every=STEPS, chunk=min(STEPS, 500), batch_size=16, optimizer="adamw", lr=1e-3)
one = fit(model, splits, tcfg)
tp = fit(model, splits, tcfg, parallel=Parallel("tp", devices=4, model_parallel=2))
print(f"dev loss after {STEPS} steps: one device {one.evals[-1]['dev_loss']:.5f}, split 2 x 2 "
      f"{tp.evals[-1]['dev_loss']:.5f}")

# %% [markdown]
# ## What to try next
#
# * `jnnex plan --preset gpt2-124m --devices 8`: the same arithmetic for GPT-2, and the largest model each layout fits.
# * Train with `sync_batchnorm=False` in `parallel.explicit_step` on `bn-mlp`: each device its own statistics.
# * Count the all-reduces in `jax.jit(step).lower(...).as_text()` of the split GPT: 4 per block.

# %%
learn.result(dp_gap=dp_gap, pitfall_ratio=ratio, explicit_gap=explicit_gap, right_gap=right_gap,
             fsdp_fraction=per_device["FSDP over 4"] / per_device["one device"],
             tp_fraction=per_device["TP 2 x 2"] / per_device["one device"],
             one_dev_loss=one.evals[-1]["dev_loss"], tp_dev_loss=tp.evals[-1]["dev_loss"], steps=STEPS)

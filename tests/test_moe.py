"""The mixture-of-experts MLP (:mod:`jnnex.models.moe`): its hand-written backward against ``jax.vjp`` in float64
over drawn problems (every top-k, logits that tie exactly), the load-balancing loss against its values worked out by
hand, the gates' sparsity, and the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pairs
import jnnex.models.moe as M
from jnnex.check import compare
from pairs import f64

FIXED = {"moe": (f64(2, 3, 4), f64(4, 3) * 0.5, f64(3, 4, 2) * 0.5, f64(3, 2, 4) * 0.5, 2, 2, 2, None, None)}

test_pair_backward_equals_vjp_float64, test_pair_rejects_a_wrongly_shaped_gradient, test_pairs_are_declared = \
    pairs.tests(M, FIXED)


def test_gates_are_the_softmax_of_the_chosen_logits_and_zero_elsewhere():
    x, Wr, W1, W2 = FIXED["moe"][:4]
    _, cache = M.moe_forward(x, Wr, W1, W2, 2)
    gates = np.asarray(cache[2].gates)
    logits = np.asarray(x.reshape(-1, 4) @ Wr)
    for n in range(len(logits)):
        top = np.argsort(-logits[n], kind="stable")[:2]
        want = np.zeros(3)
        want[top] = np.exp(logits[n, top]) / np.exp(logits[n, top]).sum()
        np.testing.assert_allclose(gates[n], want, rtol=1e-12)
    # top_k = every expert: the gates are the full softmax; top_k = 1: the output is one expert's alone
    _, c_all = M.moe_forward(x, Wr, W1, W2, 3)
    np.testing.assert_allclose(np.asarray(c_all[2].gates), np.asarray(jax.nn.softmax(logits, -1)), rtol=1e-12)
    _, c1 = M.moe_forward(x, Wr, W1, W2, 1)
    assert set(np.unique(np.asarray(c1[2].gates))) == {0.0, 1.0}


def test_the_balancing_loss_is_one_when_uniform_and_e_when_one_expert_takes_all():
    """A zero router: every token's probabilities uniform, ties everywhere going to experts 0..k-1 — aux = E · Σ f_e
    /E = 1. A router that sends every token to expert 1 with probability → 1: aux → E (here 3), top-1."""
    x, _, W1, W2 = FIXED["moe"][:4]
    (_, aux), _ = M.moe_forward(x, jnp.zeros((4, 3), jnp.float64), W1, W2, 2)
    assert float(aux) == pytest.approx(1.0, rel=1e-12)
    Wr = jnp.zeros((4, 3), jnp.float64).at[:, 1].set(50.0)
    xs = jnp.abs(x) + 1.0  # every token's logit for expert 1 is large
    (_, aux), _ = M.moe_forward(xs, Wr, W1, W2, 1)
    assert float(aux) == pytest.approx(3.0, rel=1e-6)


def test_ties_and_every_top_k_against_vjp():
    """Two router columns equal (exact ties for every token) and every top-k: the backward is jax.vjp's, to 1e-10
    in float64, the router's gradient included (the balancing loss reaches it through the full softmax)."""
    x, Wr, W1, W2 = FIXED["moe"][:4]
    Wr = Wr.at[:, 2].set(Wr[:, 0])
    names = ["dx", "dWr", "dW1", "dW2", "k", "capacity", "groups", "axis", "model_axis"]
    for k in (1, 2, 3):
        for capacity, groups in ((None, 1), (1, 2), (2, 3)):  # dropless; 1 slot per expert in each of 2 groups; …
            rows = compare(M.moe_forward, M.moe_backward, x, Wr, W1, W2, k, capacity, groups, None, None,
                           names=names)
            assert all(r.approx for r in rows), (k, capacity, rows)
            assert float(np.abs(np.asarray(rows[1].maxdiff))) < 1e-12


@pytest.mark.parametrize("args, message", [
    ((f64(2, 4), f64(3, 3), f64(3, 4, 2), f64(3, 2, 4), 1), r"W_router must be \(C, E\) = \(4, E\)"),
    ((f64(2, 4), f64(4, 3), f64(2, 4, 2), f64(3, 2, 4), 1), r"with 3 experts and C = 4, W1 must be \(E, C, H\)"),
    ((f64(2, 4), f64(4, 3), f64(3, 4, 2), f64(3, 2, 4), 4), r"top_k must be an integer in \[1, 3\]"),
    ((f64(2, 4), f64(4, 3), f64(3, 4, 2), f64(3, 2, 4), 0), r"top_k must be an integer in \[1, 3\]"),
])
def test_bad_shapes_and_top_k_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        M.moe_forward(*args)


def test_tokens_past_an_experts_capacity_are_dropped_and_counted():
    """Top-1, every token's largest logit on expert 1, 2 slots per expert and group: 3 groups of 2 tokens keep all;
    1 group of 6 drops 4 — and a dropped token's output is exactly 0 (its only expert lost). Dropless drops none."""
    x = jnp.abs(FIXED["moe"][0]) + 1.0  # (2, 3, 4): 6 tokens
    Wr = jnp.zeros((4, 3), jnp.float64).at[:, 1].set(1.0)
    W1, W2 = FIXED["moe"][2:4]
    assert int(M.dropped(x, Wr, 1, 2, groups=3)) == 0
    assert int(M.dropped(x, Wr, 1, 2, groups=1)) == 4
    assert int(M.dropped(x, Wr, 1, None)) == 0
    (y, _), _ = M.moe_forward(x, Wr, W1, W2, 1, 2, 1)
    y = np.asarray(y).reshape(6, 4)
    assert np.all(y[2:] == 0) and np.all(np.abs(y[:2]) > 0)  # the first two in the queue kept, the rest dropped
    (y_free, _), _ = M.moe_forward(x, Wr, W1, W2, 1, None)
    np.testing.assert_array_equal(np.asarray(y_free).reshape(6, 4)[:2], y[:2])
    assert M.capacity_for(1.0, 6, 3, 1) == 2 and M.capacity_for(1.25, 16, 8, 2) == 5


def expert_parallel(n, args, capacity, dtype):
    """The layer under ``shard_map`` over ``n`` devices (tokens and experts split, the router whole) and its
    hand-written backward: ``(y, aux, dx, dW_router summed over the devices, dW1, dW2)``, whole."""
    from jax.sharding import Mesh, PartitionSpec as P
    x, Wr, W1, W2, k, dy = args
    mesh = Mesh(np.array(jax.devices()[:n]), ("expert",))

    def local(x, Wr, W1, W2, dy):
        (y, aux), cache = M.moe_forward(x, Wr, W1, W2, k, capacity, 1, "expert")
        dx, dWr, dW1, dW2, *_ = M.moe_backward((dy, jnp.asarray(0.7, dtype)), cache)
        return y, aux, dx, jax.lax.psum(dWr, "expert"), dW1, dW2

    rows, experts = P("expert"), P("expert")
    f = jax.shard_map(local, mesh=mesh, in_specs=(rows, P(), experts, experts, rows),
                      out_specs=(rows, P(), rows, P(), experts, experts), check_vma=False)
    return jax.jit(f)(x, Wr, W1, W2, dy)


@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-12), (jnp.float32, 1e-5)])
@pytest.mark.parametrize("E, k, capacity", [(4, 2, None), (8, 2, 2), (8, 3, 1), (4, 2, 1)])
def test_expert_parallelism_equals_one_device(E, k, capacity, dtype, tol):
    """4 devices, 4 tokens each (a group each) and E / 4 experts each, against the layer on one device with 4 groups:
    the outputs, the balancing loss and every gradient, per tensor — dropless and with tokens dropped, with two router
    columns tied."""
    n, N, C, H = 4, 16, 6, 5
    ks = jax.random.split(jax.random.key(E * 10 + k), 5)
    x = jax.random.normal(ks[0], (N, C), dtype)
    Wr = (jax.random.normal(ks[1], (C, E), dtype) * C**-0.5).at[:, E - 1].set(0)
    Wr = Wr.at[:, 1].set(Wr[:, 0])  # ties
    W1 = jax.random.normal(ks[2], (E, C, H), dtype) * C**-0.5
    W2 = jax.random.normal(ks[3], (E, H, C), dtype) * H**-0.5
    dy = jax.random.normal(ks[4], (N, C), dtype)
    @jax.jit  # (the one-device reference one compiled program, not an eager op at a time)
    def one_device(x, Wr, W1, W2, dy):
        (y, aux), cache = M.moe_forward(x, Wr, W1, W2, k, capacity, n)
        return (y, aux, *M.moe_backward((dy, jnp.asarray(0.7, dtype)), cache)[:4])

    want = one_device(x, Wr, W1, W2, dy)
    got = expert_parallel(n, (x, Wr, W1, W2, k, dy), capacity, dtype)
    for name, g, w in zip(["y", "aux", "dx", "dW_router", "dW1", "dW2"], got, want):
        scale = max(float(jnp.max(jnp.abs(w))), 1e-30)
        assert float(jnp.max(jnp.abs(g - w))) / scale < tol, name
    if capacity is not None and k * (N // n) > E * capacity:  # more choices in a group than slots: some dropped
        assert int(M.dropped(x, Wr, k, capacity, n)) > 0


def test_the_token_exchange_is_two_all_to_alls_each_way():
    """The forward sends the buffers to the experts and the outputs back; the backward the output gradients to the
    experts and the input gradients back: two ``all_to_all`` each, written out (none in one device's layer)."""
    from jax.sharding import Mesh, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()[:2]), ("expert",))
    x, Wr, W1, W2 = f64(4, 6), f64(6, 4), f64(4, 6, 3), f64(4, 3, 6)

    def fwd(x, Wr, W1, W2):
        return M.moe_forward(x, Wr, W1, W2, 2, None, 1, "expert")[0]

    def both(x, Wr, W1, W2):
        out, cache = M.moe_forward(x, Wr, W1, W2, 2, None, 1, "expert")
        return M.moe_backward(out, cache)[:4]

    specs = (P("expert"), P(), P("expert"), P("expert"))
    count = {}
    for name, f, out in (("forward", fwd, (P("expert"), P())), ("both", both, (P("expert"),) * 4)):
        sm = jax.shard_map(f, mesh=mesh, in_specs=specs, out_specs=out, check_vma=False)
        count[name] = str(jax.make_jaxpr(sm)(x, Wr, W1, W2)).count("all_to_all")
    assert count == {"forward": 2, "both": 4}
    assert "all_to_all" not in str(jax.make_jaxpr(lambda *a: M.moe_forward(*a, 2)[0])(x, Wr, W1, W2))


# ----------------------------------------------------------------------------------------------------------------------
# The Llama with experts (--n-expert E --expert-top-k K)


def moe_llama(**kw):
    from jnnex.models import llama as L
    return L.llama(L.LlamaConfig(**{"vocab_size": 11, "block_size": 8, "n_layer": 2, "n_head": 2, "n_kv_head": 1,
                                    "n_embd": 16, "n_expert": 4, "expert_top_k": 2, **kw}))


@pytest.mark.parametrize("kw", [{}, {"expert_capacity": 0.5, "tie": True}, {"expert_top_k": 1, "recompute": "blocks"},
                                {"aux_weight": 0.3, "expert_hidden": 7}])
def test_the_llama_with_experts_hand_written_gradients_equal_jax_grad_per_tensor(kw):
    """The objective (cross-entropy + aux_weight · the blocks' mean balancing loss) and every gradient, the routers'
    included, by hand against ``jax.grad`` in float64 — dropless, dropping (a capacity factor of 0.5), top-1 with
    recomputation."""
    from jnnex.lm import manual_gradients
    model = moe_llama(**kw)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(0))[0])
    x = jax.random.randint(jax.random.key(1), (4, 8), 0, 11)
    y = jax.random.randint(jax.random.key(2), (4, 8), -1, 11)

    @jax.jit  # (one compiled program each, not an eager op at a time)
    def both(params, x, y):
        (want_loss, _), want = jax.value_and_grad(model.objective, has_aux=True)(params, (), x, y)
        got = manual_gradients(model, params, (), x, y)
        return want_loss, want, got.loss, got.grads, model.loss(params, (), x, y)[0]

    want_loss, want, got_loss, got_grads, ce = both(params, x, y)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-13)
    assert float(got_loss - ce) > 0  # the balancing loss is in the objective
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got_grads)):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-12, err_msg=jax.tree_util.keystr(path))
    if "expert_capacity" in kw:
        blk = params.blocks[0]
        assert blk.experts.W1.shape == (4, 16, model.cfg.expert_width)


def test_expert_width_matches_the_dense_swiglus_active_parameters_and_bad_settings_are_named():
    from jnnex.models import llama as L
    cfg = L.LlamaConfig(n_embd=64, n_expert=8, expert_top_k=2)
    assert cfg.hidden == 192 and cfg.expert_width == 144  # 3 · 64 · 192 = 2 · (2 · 64 · 144)
    for over, message in [({"expert_top_k": 3}, "expert_top_k apply to a mixture of experts: give n_expert too"),
                          ({"n_expert": 1}, "n_expert must be an integer >= 2"),
                          ({"n_expert": 4, "expert_top_k": 5}, r"expert_top_k must be an integer in \[1, n_expert"),
                          ({"n_expert": 4, "expert_capacity": 0}, "expert_capacity must be a number > 0"),
                          ({"n_expert": 4, "precision": "bfloat16"}, "not supported yet")]:
        with pytest.raises(ValueError, match=message):
            L.LlamaConfig(**over)
    rules = moe_llama().split_fn(moe_llama().cfg)  # tensor parallel: the attention, and each expert's hidden units
    assert set(rules) == {"qkv", "attproj", "experts"} and rules["experts"].hidden.count == moe_llama().cfg.expert_width
    from jnnex.tensor_parallel import check_split
    with pytest.raises(ValueError, match=r"expert_width \(6\) must be divisible by the model axis \(4 devices\)"):
        check_split(moe_llama(n_head=4, n_kv_head=4, expert_hidden=6), 4)


def test_expert_parallel_gradients_equal_one_devices_per_tensor_in_float64():
    """The Llama with 4 experts top-2 on 4 devices (one expert and a quarter of the rows each; dropless): the
    objective and every gradient equal one device's, per tensor — the routers' and the experts' included."""
    import jnnex.expert_parallel as EP
    from jnnex.lm import manual_gradients
    from jnnex.parallel import data_mesh
    model = moe_llama(tie=True)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(0))[0])
    x = jax.random.randint(jax.random.key(1), (8, 8), 0, 11)
    y = jax.random.randint(jax.random.key(2), (8, 8), -1, 11)
    want = jax.jit(lambda p: manual_gradients(model, p, (), x, y))(params)  # (one program, not op by op)
    f = jax.jit(EP.split_value_and_grad(model, data_mesh(4), params))
    loss, grads, _ = f(params, (), x, y, jax.random.key(0))
    np.testing.assert_allclose(loss, want.loss, rtol=0, atol=1e-13)
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want.grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-12, err_msg=jax.tree_util.keystr(path))
    text = str(jax.make_jaxpr(EP.split_value_and_grad(model, data_mesh(4), params))(params, (), x, y,
                                                                                     jax.random.key(0)))
    assert text.count("all_to_all") == 4 * model.cfg.n_layer  # two each way per block, forward and backward


def test_an_expert_parallel_run_checkpoints_and_resumes_where_one_device_ends(tmp_path):
    """4 steps on 4 devices (``Parallel("ep", 4)``), checkpointed, resumed to 8 on one device: where 8 steps on one
    device end, to float32's rounding. Short, because routing compounds rounding: a router logit that differs in its
    last bit can choose another expert (measured, ep against one device, max relative error per tensor: 9e-8 after 1
    step, 5e-7 after 5, 7e-6 after 10, 1.5e-5 after 20). The float64 test above is the proof of equality."""
    from tests.runfiles import fit_resumed, fit_saved
    from tests.test_parallel import model_and_data, rel_errors
    from jnnex.layout import Parallel
    from jnnex.optim import TrainConfig
    from jnnex.train import fit
    model, splits = model_and_data("llama", n_head=4, n_kv_head=2, n_expert=4, expert_top_k=2)
    short = TrainConfig(steps=4, eval_every=4, chunk=4, lr_boundaries=(), optimizer="momentum", lr=0.1)
    fit_saved(model, splits.train, short, tmp_path / "r", parallel=Parallel("ep", 4))
    resumed = fit_resumed(model, splits.train, short.with_steps(8), tmp_path / "r")
    whole = fit(model, splits.train, short.with_steps(8))
    assert max(rel_errors(resumed.ts.params, whole.ts.params)) < 1e-5
    with pytest.raises(ValueError, match=r"the experts \(n_expert 4\) must divide over the 3 devices"):
        fit(model, splits.train, short, parallel=Parallel("ep", 3))
    plain, plain_splits = model_and_data("llama", n_head=4, n_kv_head=2)
    with pytest.raises(ValueError, match="model 'llama' has no experts"):
        fit(plain, plain_splits.train, short, parallel=Parallel("ep", 4))

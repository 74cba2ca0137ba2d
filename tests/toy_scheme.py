"""A toy parallel scheme, as a user would add one: this module plus one row of :data:`jnnex.layout.SCHEMES` (see
test_parallel.py).

Data parallel written the explicit way (:func:`jnnex.parallel.explicit_step`): each device its shard of the batch
under ``jax.shard_map``, the losses and gradients summed over ``"data"`` by ``psum``, every device a whole copy of the
state. The same steps as one device's, for a model without dropout (each shard draws its own masks).
"""

from jnnex import parallel
from jnnex.layout import Layout, Parallel


def explicit_data_parallel(model, optimizer, par: Parallel, ts_like, *, diagnostics: bool = False) -> Layout:
    if diagnostics:
        raise ValueError("dp-explicit: its step returns the loss alone; train without diagnostics")
    mesh = parallel.data_mesh(par.devices)
    return Layout(optimizer, parallel.explicit_step(model, optimizer, mesh), mesh)


ROW = {"dp-explicit": explicit_data_parallel}  # the row a test adds to jnnex.layout.SCHEMES

"""Every file jnnex reads gives a clear error naming it: truncated, not an npz, pickled content, another model."""

import os
import stat

import jax.numpy as jnp
import numpy as np
import pytest

from jnnex.rundir import load_pytree, read_json, save_pytree, write_json

TREE = {"W": jnp.ones((3, 2), jnp.float32), "b": jnp.zeros((2,), jnp.float32)}


def test_atomic_files_get_the_usual_permissions_and_leave_no_temporaries(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    save_pytree(tmp_path / "p.npz", TREE)
    mask = os.umask(0)
    os.umask(mask)
    for name in ("a.json", "p.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask
    assert read_json(tmp_path / "a.json") == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "p.npz"]


def _corrupt_files(tmp_path):
    good = tmp_path / "good.npz"
    save_pytree(good, TREE)
    data = good.read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.npz").write_bytes(np.random.default_rng(0).bytes(2000))
    (tmp_path / "empty.npz").write_bytes(b"")
    np.save(tmp_path / "single.npy", np.ones(3))
    np.savez(tmp_path / "pickled.npz", **{"['W']": np.array([{"a": 1}], dtype=object), "['b']": np.zeros(2)})
    np.savez(tmp_path / "other.npz", **{"['W']": np.ones((4, 2), np.float32), "['b']": np.zeros(2, np.float32)})
    np.savez(tmp_path / "missing.npz", **{"['W']": np.ones((3, 2), np.float32)})
    np.savez(tmp_path / "extra.npz", **{"['W']": np.ones((3, 2), np.float32), "['b']": np.zeros(2, np.float32),
                                        "['c']": np.zeros(1)})
    return {
        "truncated.npz": "truncated or corrupt", "random.npz": "truncated or corrupt", "empty.npz": "truncated or corrupt",
        "single.npy": "single .npy array", "pickled.npz": "pickled (object) data",
        "other.npz": "expected float32[3, 2]", "missing.npz": "has no array \"['b']\"",
        "extra.npz": "arrays this model does not", "nope.npz": "does not exist",
    }


def test_every_bad_checkpoint_is_a_clear_error_naming_the_file(tmp_path):
    cases = _corrupt_files(tmp_path)
    for name, words in cases.items():
        with pytest.raises(ValueError) as e:
            load_pytree(tmp_path / name, TREE)
        assert name in str(e.value) and words in str(e.value), (name, str(e.value))
        assert "allow_pickle" not in str(e.value)  # numpy's hint would be misleading: jnnex never unpickles
    np.testing.assert_array_equal(load_pytree(tmp_path / "good.npz", TREE)["W"], TREE["W"])


def test_bad_json_is_a_clear_error(tmp_path):
    (tmp_path / "c.json").write_text('{"model": "mlp", ')
    with pytest.raises(ValueError, match="c.json' is not valid JSON"):
        read_json(tmp_path / "c.json")
    (tmp_path / "b.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="b.json' is not valid JSON"):
        read_json(tmp_path / "b.json")

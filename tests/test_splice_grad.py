"""The splice's VJP (`multimodal.routed_rows`: gathers, no scatter) against the splice's own
forward map: with one-hot payloads (text row t = e_t, vision row v = e_{T+v}) the spliced rows
spell out the Jacobian J[b, j, source], so the exact gradient of sum(w * seq) is J^T w."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from covipal_jax.models import multimodal as mm


def _jacobian(fn, b, t, k):
    eye = jnp.eye(t + k, dtype=jnp.float32)
    te = jnp.broadcast_to(eye[:t], (b, t, t + k))
    vis = jnp.broadcast_to(eye[t:], (b, k, t + k))
    return np.asarray(fn(te, vis))                                        # [B, L, T + k]


def _check(fn, b, t, k, d=5, seed=0):
    rng = np.random.default_rng(seed)
    te = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    vis = jnp.asarray(rng.normal(size=(b, k, d)), jnp.float32)
    seq = fn(te, vis)
    w = jnp.asarray(rng.normal(size=seq.shape), jnp.float32)
    g_te, g_vis = jax.grad(lambda a, v: jnp.sum(fn(a, v) * w), argnums=(0, 1))(te, vis)
    jac = _jacobian(fn, b, t, k)
    ref = np.einsum("bjs,bjd->bsd", jac, np.asarray(w))
    np.testing.assert_allclose(np.asarray(g_te), ref[:, :t], atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_vis), ref[:, t:], atol=1e-6)
    # and the scatter-free program has no scatter
    hlo = jax.jit(jax.grad(lambda a, v: jnp.sum(fn(a, v) * w), argnums=(0, 1))).lower(
        te, vis).as_text()
    assert "scatter" not in hlo
    return jac


def test_one_placeholder_left_padded():
    b, t, k = 3, 9, 4
    mask = np.zeros((b, t), bool)
    for i, p in enumerate([0, 2, 4]):
        mask[i, p:] = True
    pos = jnp.asarray([1, 3, 8], jnp.int32)          # the last row's image is the last token
    jac = _check(lambda a, v: mm.splice(a, jnp.asarray(mask), pos, v)[0], b, t, k)
    # every vision token and every non-placeholder text token lands exactly once
    assert (jac.sum(1)[:, t:] == 1).all()
    assert jac.sum(1)[np.arange(b), np.asarray(pos)].sum() == 0


def test_several_placeholders_with_an_empty_image():
    b, t, k = 2, 8, 5
    mask = jnp.ones((b, t), bool)
    pos = jnp.asarray([[1, 4], [2, 6]], jnp.int32)
    img = jnp.asarray([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]], jnp.int32)   # row 1: image 0 empty
    _check(lambda a, v: mm.splice(a, mask, pos, v, vis_image=img)[0], b, t, k)


def test_packed_rows_with_absent_images():
    b, t, k = 3, 7, 6
    mask = jnp.asarray(np.arange(t)[None, :] >= np.asarray([[0], [0], [1]]))  # row 2 padded
    pos = jnp.asarray([[1, 3], [2, 0], [4, 5]], jnp.int32)
    num = jnp.asarray([2, 1, 2], jnp.int32)
    img = jnp.asarray([[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]], jnp.int32)
    valid = jnp.ones((b, k), bool)
    _check(lambda a, v: mm.splice_packed(a, mask, pos, num, v, img, valid)[0], b, t, k)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.float32])
def test_forward_unchanged_for_payloads(dtype):
    """Integer payloads (the packed splice's validity / positions) still splice."""
    te = jnp.arange(2 * 5, dtype=dtype).reshape(2, 5, 1)
    vis = 100 + jnp.arange(2 * 3, dtype=dtype).reshape(2, 3, 1)
    seq, m, _, is_vis = mm.splice(te, jnp.ones((2, 5), bool), jnp.asarray([1, 4]), vis)
    np.testing.assert_array_equal(np.asarray(seq[..., 0]),
                                  [[0, 100, 101, 102, 2, 3, 4], [5, 6, 7, 8, 103, 104, 105]])
    assert bool(m.all()) and int(is_vis.sum()) == 6

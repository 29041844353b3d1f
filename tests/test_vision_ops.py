"""Position-embedding interpolation, pixel shuffle (v1/v2) and the multimodal merge."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from r1v2_jax.model.interpolate import bicubic_matrix, resize_grid
from r1v2_jax.model.vision import pixel_shuffle
from r1v2_jax.model.vlm import merge_image_features


@pytest.mark.parametrize(
    "src,dst", [((32, 32), (24, 24)), ((32, 32), (40, 40)), ((4, 4), (7, 7)), ((5, 7), (3, 11)), ((16, 16), (16, 16))]
)
def test_position_embedding_interpolation_matches_torch_bicubic(src, dst):
    rng = np.random.default_rng(0)
    grid = rng.standard_normal(src + (8,)).astype(np.float32)
    ours = np.asarray(resize_grid(jnp.asarray(grid), *dst))
    t = torch.tensor(grid).permute(2, 0, 1)[None]
    theirs = F.interpolate(t, size=dst, mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_bicubic_rows_sum_to_one_and_differ_from_keys_half():
    m = bicubic_matrix(32, 24)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)
    # jax.image.resize's bicubic (a = -0.5, antialiased) is a different operator: make sure
    # we are not silently equal to it.
    import jax

    g = np.random.default_rng(1).standard_normal((32, 32, 4)).astype(np.float32)
    keys = np.asarray(jax.image.resize(g, (24, 24, 4), "bicubic"))
    assert np.abs(keys - np.asarray(resize_grid(jnp.asarray(g), 24, 24))).max() > 1e-3


def _torch_pixel_shuffle(x, scale_factor, ps_version):
    """InternVL-Chat's pixel_shuffle, transcribed from the released modeling code's description."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    if ps_version != "v1":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_pixel_shuffle_versions(version, ratio):
    x = np.random.default_rng(2).standard_normal((3, 8, 8, 5)).astype(np.float32)
    ours = np.asarray(pixel_shuffle(jnp.asarray(x), ratio, version))
    theirs = _torch_pixel_shuffle(torch.tensor(x), ratio, version).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_pixel_shuffle_versions_differ():
    x = jnp.arange(2 * 4 * 4 * 2, dtype=jnp.float32).reshape(2, 4, 4, 2)
    assert not np.array_equal(pixel_shuffle(x, 0.5, "v1"), pixel_shuffle(x, 0.5, "v2"))


def test_merge_image_features_hand_example():
    text = jnp.arange(2 * 4 * 2, dtype=jnp.float32).reshape(2, 4, 2)
    ids = jnp.array([[5, 9, 9, 1], [9, 2, 3, 9]])
    feats = jnp.array([[100.0, 101], [200, 201], [300, 301], [400, 401]])
    out = np.asarray(merge_image_features(text, ids, feats, image_token_id=9))
    expected = np.asarray(text).copy()
    expected[0, 1], expected[0, 2], expected[1, 0], expected[1, 3] = feats[0], feats[1], feats[2], feats[3]
    np.testing.assert_array_equal(out, expected)


def test_merge_no_image_tokens_is_identity():
    text = jnp.ones((1, 3, 2))
    out = merge_image_features(text, jnp.array([[1, 2, 3]]), jnp.zeros((4, 2)), image_token_id=9)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(text))


def test_per_row_merge_matches_flat_merge_and_ignores_padding():
    from r1v2_jax.model.vlm import merge_image_features_per_row

    rng = np.random.default_rng(0)
    text = jnp.asarray(rng.normal(size=(2, 6, 3)), jnp.float32)
    ids = jnp.array([[9, 9, 1, 9, 9, 2], [1, 9, 9, 3, 4, 5]])
    feats_flat = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    # row 0 has 4 features, row 1 has 2 (+2 padding rows of garbage)
    per_row = jnp.stack([feats_flat[:4], jnp.concatenate([feats_flat[4:], jnp.full((2, 3), 1e9)])])
    a = merge_image_features(text, ids, feats_flat, 9)
    b = merge_image_features_per_row(text, ids, per_row, 9)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

import numpy as np
import tensorflow as tf
from hypothesis import given
from hypothesis import strategies as st

from deel_lipdp_ext.layers.spectral import conv_overlap, spectral_norm_upper_bound


@given(
    st.integers(1, 40), st.integers(1, 40), st.integers(0, 10_000), st.floats(1e-3, 1e3)
)
def test_gram_bound_is_an_upper_bound_and_tight(m, n, seed, scale):
    w = np.random.default_rng(seed).normal(size=(m, n)) * scale
    true = np.linalg.norm(w, 2)
    bound = float(spectral_norm_upper_bound(tf.constant(w, tf.float32)))
    assert bound >= true * (1 - 1e-6)
    assert bound <= true * 1.002


def test_gram_bound_on_orthogonal_and_rank_one_and_zero():
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(256, 256)))
    b = float(spectral_norm_upper_bound(tf.constant(q)))
    assert 1.0 <= b <= 1.001  # all singular values equal: the hardest case for Gram
    u = np.outer(np.arange(1, 6), np.arange(1, 4)).astype(float)
    assert float(spectral_norm_upper_bound(tf.constant(u))) >= np.linalg.norm(u, 2)
    assert float(spectral_norm_upper_bound(tf.zeros((3, 4)))) == 0.0


def test_conv_overlap():
    assert conv_overlap((3, 3), (1, 1)) == 9
    assert conv_overlap((3, 3), (2, 2)) == 4
    assert conv_overlap((2, 2), (2, 2)) == 1
    assert conv_overlap((5, 1), (2, 1)) == 3

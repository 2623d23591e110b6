"""DP_BoundedInput on extreme finite samples: projection and the bound check."""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from deel_lipdp_ext import layers as L

F32_MAX = float(np.finfo(np.float32).max)


def _assert_projected(x, out, bound):
    """`out` is finite, within the ball, along `x`, and no shorter than needed."""
    x64, out64 = x.astype(np.float64), np.asarray(out, np.float64)
    assert np.all(np.isfinite(out64))
    norm_x = np.linalg.norm(x64.reshape(len(x64), -1), axis=1)
    norm_out = np.linalg.norm(out64.reshape(len(out64), -1), axis=1)
    assert np.all(norm_out <= bound * (1 + 1e-6)), (norm_out, bound)
    assert np.all(norm_out >= np.minimum(norm_x, bound) * (1 - 1e-5)), (norm_out,)
    for a, b, na, nb in zip(x64, out64, norm_x, norm_out, strict=True):
        if na == 0:
            assert nb == 0
        else:  # same direction: cosine 1
            assert np.sum(a * b) / (na * nb) >= 1 - 1e-6
    inside = norm_x <= bound * (1 - 1e-6)
    np.testing.assert_array_equal(out64[inside], x64[inside])


@pytest.mark.parametrize(
    "sample,bound",
    [
        ([3e38] * 8, 1.0),
        ([F32_MAX, -F32_MAX] * 4, 2.0),
        ([1e30] * 8, 1.0),
        ([-1e30, 1e30, 0.0, 5.0], 1e12),  # the largest bound (MAX_INPUT_BOUND)
        ([1e-30] * 8, 1.0),
        ([1e-25] * 100, 1e-26),
        ([3e38] + [1.0] + [0.0] * 6, 0.5),
        ([0.0] * 8, 1.0),
    ],
    ids=["3e38", "f32max", "1e30", "1e30-big-bound", "1e-30", "tiny", "one", "zero"],
)
def test_bounded_input_projects_extreme_finite_samples_onto_the_ball(sample, bound):
    x = np.asarray([sample], np.float32)
    assert np.all(np.isfinite(x))
    out = L.DP_BoundedInput(upper_bound=bound)(x).numpy()
    _assert_projected(x, out, bound)


@st.composite
def _extreme_batches(draw):
    """float32 batches whose samples have magnitudes from subnormal to max."""
    batch = draw(st.integers(1, 4))
    shape = (batch, *draw(st.sampled_from([(1,), (7,), (3, 3, 2), (40,)])))
    unit = draw(hnp.arrays(np.float64, shape, elements=st.floats(-1.0, 1.0, width=32)))
    exponents = draw(hnp.arrays(np.int64, (batch,), elements=st.integers(-45, 39)))
    scales = 10.0 ** exponents.astype(np.float64)
    x = np.clip(unit * scales.reshape(-1, *[1] * (len(shape) - 1)), -F32_MAX, F32_MAX)
    raw = draw(
        hnp.arrays(
            np.float32,
            shape,
            elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
        )
    )
    return draw(st.sampled_from([x.astype(np.float32), raw]))


@settings(max_examples=60)
@given(x=_extreme_batches(), bound=st.sampled_from([1e-20, 1e-3, 0.5, 1.0, 1e12]))
def test_bounded_input_projection_keeps_norm_and_direction_for_any_finite_sample(
    x, bound
):
    out = L.DP_BoundedInput(upper_bound=bound)(x).numpy()
    _assert_projected(x, out, bound)
    # the projected batch passes the no-clipping check (same safe norm)
    checker = L.DP_BoundedInput(upper_bound=bound, enforce_clipping=False)
    checker.check_bound(tf.constant(out))


@pytest.mark.parametrize(
    "sample,bound,ok",
    [
        ([1e-25] * 100, 1e-26, False),  # squares underflow to 0 in a plain norm
        ([1e-27] * 4, 1e-26, True),
        ([6e11, 8e11], 1e12, True),  # at the largest bound (MAX_INPUT_BOUND)
        ([6e11, 8.1e11], 1e12, False),
        ([3e38] * 4, 1e12, False),  # squares overflow to inf in a plain norm
        ([0.0] * 4, 1e-30, True),
    ],
)
def test_check_bound_uses_an_overflow_safe_norm(sample, bound, ok):
    layer = L.DP_BoundedInput(upper_bound=bound, enforce_clipping=False)
    x = tf.constant([sample], tf.float32)
    if ok:
        layer.check_bound(x)
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match="upper_bound"):
            layer.check_bound(x)

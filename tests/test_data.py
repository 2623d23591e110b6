import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from deel_lipdp_ext import data, pipeline

from .layers.test_bounded import _extreme_batches


def test_poisson_batches_follow_binomial_and_mask_padding():
    n, b = 1000, 100
    x = np.arange(n, dtype=np.float32).reshape(n, 1) + 1.0
    y = np.ones((n, 2), np.float32)
    ds = data.poisson_batches(x, y, b, seed=3)
    sizes, seen = [], set()
    for _ in range(30):  # 30 epochs of 10 steps
        for xb, _, mask in ds:
            m = mask.numpy()
            k = int(m.sum())
            assert np.all(m[:k] == 1) and np.all(m[k:] == 0)
            assert np.all(xb.numpy()[k:] == 0)
            assert len(set(xb.numpy()[:k, 0])) == k  # no duplicates in a batch
            seen.update(xb.numpy()[:k, 0].tolist())
            sizes.append(k)
    assert len(sizes) == 300
    # Binomial(n, q): mean and variance, and a KS-style check of the distribution.
    assert np.mean(sizes) == pytest.approx(b, rel=0.03)
    assert np.var(sizes) == pytest.approx(n * 0.1 * 0.9, rel=0.3)
    assert stats.chisquare(*_binned(sizes, n, 0.1)).pvalue > 1e-3
    assert len(seen) == n


def _binned(sizes, n, q):
    edges = [0, 85, 92, 97, 100, 103, 108, 115, n + 1]
    observed = np.histogram(sizes, bins=edges)[0]
    cdf = stats.binom.cdf(np.array(edges) - 1, n, q)
    expected = np.diff(cdf) * len(sizes)
    return observed, expected


def test_poisson_batches_are_reproducible_and_fresh_each_epoch():
    x = np.random.rand(200, 3).astype(np.float32)
    y = np.ones((200, 1), np.float32)
    a = [m.numpy().sum() for _, _, m in data.poisson_batches(x, y, 20, seed=1)]
    b = [m.numpy().sum() for _, _, m in data.poisson_batches(x, y, 20, seed=1)]
    assert a == b
    ds = data.poisson_batches(x, y, 20, seed=1)
    e1 = [xb.numpy()[0].tolist() for xb, _, _ in ds]
    e2 = [xb.numpy()[0].tolist() for xb, _, _ in ds]
    assert e1 != e2


def test_max_poisson_batch_size():
    assert (
        data.max_poisson_batch_size(1000, 0.1)
        == 1000 * 0.1 + np.ceil(10 * np.sqrt(90)) + 10
    )
    assert data.max_poisson_batch_size(10, 0.9) == 10


def test_bounding_functions():
    x = np.random.default_rng(0).normal(size=(5, 3, 3)).astype(np.float32) * 7
    x[0] = 0
    norms = np.linalg.norm(data.bound_normalize(2.0)(x).reshape(5, -1), axis=1)
    np.testing.assert_allclose(norms, [0, 2, 2, 2, 2], rtol=1e-5)
    clipped = data.bound_clip_value(0.5)(x * 1e-3)
    np.testing.assert_allclose(clipped, x * 1e-3)  # inside the ball: unchanged
    assert np.all(
        np.linalg.norm(data.bound_clip_value(0.5)(x).reshape(5, -1), axis=1)
        <= 0.5 + 1e-6
    )


def test_load_digits_dataset():
    train, test, meta = data.load_digits_dataset(batch_size=64, input_bound=1.0, seed=0)
    assert meta.input_shape == (8, 8, 1) and meta.num_classes == 10
    assert meta.nb_samples_train + meta.nb_samples_test == 1797
    assert meta.nb_steps_per_epoch == -(-meta.nb_samples_train // 64)
    assert meta.sampling_rate == pytest.approx(64 / meta.nb_samples_train)
    xb, yb, mask = next(iter(train))
    k = int(mask.numpy().sum())
    np.testing.assert_allclose(
        np.linalg.norm(xb.numpy()[:k].reshape(k, -1), axis=1), 1.0, rtol=1e-5
    )
    np.testing.assert_allclose(yb.numpy()[:k].sum(axis=1), 1.0)
    xt, yt = next(iter(test))
    assert xt.shape[1:] == (8, 8, 1) and yt.shape[1] == 10


def test_shuffle_sampling_and_metadata():
    x = np.random.rand(103, 4).astype(np.float32)
    y = np.arange(103) % 3
    train, test, meta = data.from_numpy(
        x, y, batch_size=10, sampling="shuffle", num_classes=3
    )
    sizes = [len(xb) for xb, _ in train]
    assert sizes == [10] * 10 + [3]
    assert test is None and meta.num_classes == 3 and meta.sampling == "shuffle"


def test_from_numpy_refuses_nan_and_bad_options():
    x = np.random.rand(10, 4).astype(np.float32)
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        data.from_numpy(x, np.zeros(10, int), batch_size=2)
    with pytest.raises(ValueError, match="'bernoulli'"):
        data.from_numpy(
            np.ones((10, 2)), np.zeros(10, int), batch_size=2, sampling="bernoulli"
        )
    with pytest.raises(ValueError, match="batch_size"):
        data.DatasetMetadata((2,), 2, 10, 0, 20, 1)
    # a bound of 0, below 0 or not finite would record itself in the metadata
    for bound in (0.0, -1.0, float("nan"), float("inf")):
        for preprocessing in ("normalize", "clip"):
            with pytest.raises(ValueError, match="input_bound"):
                data.from_numpy(
                    np.ones((10, 2)),
                    np.zeros(10, int),
                    batch_size=2,
                    num_classes=2,
                    input_bound=bound,
                    preprocessing=preprocessing,
                )
        with pytest.raises(ValueError, match="positive finite"):
            data.bound_normalize(bound)
        with pytest.raises(ValueError, match="positive finite"):
            data.bound_clip_value(bound)


def test_load_npz_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="mnist.npz"):
        data.load_npz_dataset(tmp_path / "mnist.npz", batch_size=4)
    path = tmp_path / "tiny.npz"
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x_train=rng.integers(0, 255, (20, 5, 5), dtype=np.uint8),
        y_train=rng.integers(0, 3, 20),
        x_test=rng.integers(0, 255, (6, 5, 5), dtype=np.uint8),
        y_test=rng.integers(0, 3, 6),
    )
    train, test, meta = data.load_npz_dataset(path, batch_size=4, num_classes=3)
    assert meta.input_shape == (5, 5, 1) and meta.nb_samples_test == 6
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((2, 2)))
    with pytest.raises(KeyError, match="y_train"):
        data.load_npz_dataset(tmp_path / "bad.npz", batch_size=1)


def _bounding_functions(bound):
    """Every way the library bounds a sample: the numpy batch functions of
    `data` and deel-lipdp's per-sample functions of `pipeline`."""

    def per_sample(pair):
        function, _ = pair
        return lambda x: np.stack([function(s, 0)[0].numpy() for s in x])

    return {
        "data.bound_normalize": data.bound_normalize(bound),
        "data.bound_clip_value": data.bound_clip_value(bound),
        "pipeline.bound_normalize": per_sample(pipeline.bound_normalize(bound)),
        "pipeline.bound_clip_value": per_sample(pipeline.bound_clip_value(bound)),
    }


@settings(max_examples=40, deadline=None)
@given(x=_extreme_batches(), bound=st.sampled_from([1e-20, 1e-3, 0.5, 1.0, 1e20]))
def test_no_bounding_function_leaves_a_sample_above_its_bound(x, bound):
    """Subnormal to float32-max samples: squares that underflow or overflow in
    a float32 norm must not let a sample through above the bound."""
    for name, bound_samples in _bounding_functions(bound).items():
        out = bound_samples(x)
        assert np.all(np.isfinite(out)), name
        norms = np.linalg.norm(out.astype(np.float64).reshape(len(out), -1), axis=1)
        assert np.all(norms <= bound), (name, norms.max(), bound)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 10**9), b=st.integers(1, 10**9))
def test_the_inclusion_probability_is_q_or_at_most_2_pow_64_below(n, b):
    """A full-range int64 draw r < t happens with probability (t + 2^63) / 2^64:
    within 2^-64 below q = B / N, never above (the accountant's q bounds it)."""
    from fractions import Fraction

    b = min(b, n)
    t = data._inclusion_threshold(n, b)
    q = Fraction(b, n)
    if t is None:
        assert q == 1
        return
    p = Fraction(t + 2**63, 2**64)
    assert -(2**63) <= t < 2**63
    assert q - Fraction(1, 2**64) < p <= q


def test_unpadded_poisson_batches_hold_exactly_the_sampled_rows_and_may_be_empty():
    n = 500
    x = np.arange(n, dtype=np.float32).reshape(n, 1)
    y = np.ones((n, 2), np.float32)
    ds = data.poisson_batches(x, y, 1, seed=0)  # q = 1/500: e^-1 of steps empty
    assert ds.element_spec[0].shape.as_list() == [None, 1]
    sizes = []
    for _ in range(4):
        for xb, yb, mask in ds:
            assert xb.shape[0] == yb.shape[0] == mask.shape[0]
            assert np.all(mask.numpy() == 1.0)
            sizes.append(xb.shape[0])
    assert sizes.count(0) > 0.25 * len(sizes)  # P(empty) = 0.37
    assert np.mean(sizes) == pytest.approx(1.0, rel=0.15)
    full = [xb.numpy()[:, 0] for xb, _, _ in data.poisson_batches(x, y, n, seed=0)]
    np.testing.assert_array_equal(full, [np.arange(n)])  # q = 1: every sample


def test_bucketed_poisson_batches_pad_the_same_rows_to_few_sizes():
    n, b = 2000, 100
    x = np.arange(n, dtype=np.float32).reshape(n, 1) + 1.0
    y = np.ones((n, 3), np.float32)
    width = data.poisson_bucket_width(n, b / n)
    limit = data.max_poisson_batch_size(n, b / n)
    assert width == 10
    plain = data.poisson_batches(x, y, b, seed=5)
    bucketed = data.poisson_batches(x, y, b, seed=5, padding="buckets")
    assert data.sampling_provenance(bucketed).padding == "buckets"
    shapes = set()
    for _ in range(5):
        for (xp, _, _), (xb, yb, mask) in zip(plain, bucketed, strict=True):
            k = xp.shape[0]
            size = xb.shape[0]
            shapes.add(size)
            assert size == data.poisson_bucket_size(k, n, b / n)
            assert k <= size < k + width and size <= limit and size % width == 0
            np.testing.assert_array_equal(xb.numpy()[:k], xp.numpy())
            np.testing.assert_array_equal(mask.numpy(), [1.0] * k + [0.0] * (size - k))
            assert not xb.numpy()[k:].any() and not yb.numpy()[k:].any()
    assert len(shapes) <= 10
    assert data.poisson_bucket_size(0, n, b / n) == width  # empty: masked rows
    with pytest.raises(ValueError, match="unpadded Poisson"):
        data.pad_to_buckets(bucketed)
    shuffled, _, _ = data.from_numpy(
        x, y[:, 0], batch_size=b, sampling="shuffle", num_classes=2
    )
    with pytest.raises(ValueError, match="unpadded Poisson"):
        data.pad_to_buckets(shuffled)


def test_a_poisson_batch_above_the_limit_raises_instead_of_dropping(monkeypatch):
    import tensorflow as tf

    monkeypatch.setattr(data, "max_poisson_batch_size", lambda n, q: 3)
    x, y = np.ones((100, 2), np.float32), np.ones((100, 2), np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="refusing to drop"):
        list(data.poisson_batches(x, y, 50, seed=0))
    with pytest.raises(ValueError, match="batch_size"):
        data.poisson_batches(x, y, 101)
    with pytest.raises(ValueError, match="padding"):
        data.poisson_batches(x, y, 10, padding="max")


def test_a_public_sample_count_fixes_the_rate_steps_and_metadata():
    """With nb_samples, q = B / N, the steps of an epoch and the metadata come
    from the public N, not from the rows: neighbours of 80 and 81 rows give
    the same mechanism (by default N = len(x), which a saved model records,
    and a multiple of B changes the step count when a row is added)."""
    y = np.ones((81, 2), np.float32)
    x = np.arange(81, dtype=np.float32).reshape(81, 1) + 1.0
    metas = []
    for rows in (80, 81):
        train, _, meta = data.from_numpy(
            x[:rows], y[:rows], batch_size=10, num_classes=2, nb_samples=100
        )
        provenance = data.sampling_provenance(train)
        assert (provenance.nb_samples, provenance.batch_size) == (100, 10)
        assert int(train.cardinality()) == 10
        metas.append(meta)
    assert metas[0] == metas[1]
    assert metas[0].nb_samples_train == 100 and metas[0].sampling_rate == 0.1
    # every row joins a step with probability B / N = 0.1
    ds = data.poisson_batches(x[:80], y[:80], 10, seed=0, nb_samples=100)
    joined = sum(int(mask.numpy().sum()) for _ in range(25) for *_, mask in ds)
    assert joined / (80 * 250) == pytest.approx(0.1, abs=5 * np.sqrt(0.09 / 20000))
    _, _, default = data.from_numpy(x[:80], y[:80], batch_size=10, num_classes=2)
    assert default.nb_samples_train == 80


def test_a_public_sample_count_must_bound_the_rows_and_needs_poisson():
    x, y = np.ones((50, 1), np.float32), np.ones((50, 2), np.float32)
    with pytest.raises(ValueError, match="nb_samples.*>= the 50 rows"):
        data.poisson_batches(x, y, 10, nb_samples=49)
    with pytest.raises(ValueError, match="nb_samples.*>= the 50 rows"):
        data.from_numpy(x, y, batch_size=10, nb_samples=40.5)
    with pytest.raises(ValueError, match="needs Poisson sampling"):
        data.from_numpy(x, y, batch_size=10, sampling="shuffle", nb_samples=60)


def test_the_class_count_is_never_read_from_the_training_labels():
    """num_classes=None counted max(y_train) + 1: removing the only sample of
    class 9 gave the model 9 outputs instead of 10, showing with certainty
    that it was absent (a review). The count is given, one-hot's width, or
    the held-out labels'."""
    x = np.random.rand(20, 4).astype(np.float32)
    y = np.arange(20) % 9
    y[0] = 9  # the only sample of the last class
    y_test = np.arange(10)
    for rows in (slice(0, 20), slice(1, 20)):  # with and without it
        _, _, meta = data.from_numpy(x[rows], y[rows], x[:10], y_test, batch_size=5)
        assert meta.num_classes == 10
        _, _, meta = data.from_numpy(x[rows], y[rows], batch_size=5, num_classes=12)
        assert meta.num_classes == 12
        with pytest.raises(ValueError, match="pass num_classes"):
            data.from_numpy(x[rows], y[rows], batch_size=5)
    _, _, meta = data.from_numpy(x, np.eye(11)[y], batch_size=5)
    assert meta.num_classes == 11  # one-hot: the width, not the values
    with pytest.raises(ValueError, match=r"lie in \[0, 5\).*num_classes=5, counted"):
        data.from_numpy(x, y, x[:5], np.arange(5), batch_size=5)
    for bad in (0, -1, 10.0):  # 0 fell through to max(y_train) + 1 (a review)
        with pytest.raises(ValueError, match="num_classes must be a positive int"):
            data.from_numpy(x, y, batch_size=5, num_classes=bad)

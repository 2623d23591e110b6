"""The remembered certificate (`base.CertifiedKernel`): the bound pass reuses
the projection's certificate only for the bitwise-same kernel, and no file,
assignment or forged pair can make it serve another kernel's number."""

import zipfile

import numpy as np
import pytest
import tensorflow as tf

from deel_lipdp_ext import layers as L
from deel_lipdp_ext.layers.base import CertifiedKernel

from ..helpers import dp_model, fitted_with_large_steps, small_cnn

KERNEL_LAYERS = [
    (lambda: L.DP_QuickSpectralDense(5), (7,)),
    (lambda: L.DP_SpectralDense(6), (6,)),
    (lambda: L.DP_QuickFrobeniusDense(4), (7,)),
    (lambda: L.DP_QuickSpectralConv2D(3, 3, strides=2, padding="valid"), (6, 6, 2)),
    (lambda: L.DP_SpectralConv2D(4, 2), (6, 6, 2)),
]


def _built(factory, shape):
    layer = factory()
    layer.build((None, *shape))
    return layer


def _fresh(layer) -> float:
    """The certificate computed from the current kernel, nothing remembered."""
    return float(layer._certificate(layer.kernel))


class _Counted:
    """Wraps a layer's `_certificate` and counts the Gram iterations run."""

    def __init__(self, layer):
        self.calls = 0
        self._inner = layer._certificate
        layer._certificate = self

    def __call__(self, kernel):
        self.calls += 1
        return self._inner(kernel)


@pytest.mark.parametrize("factory, shape", KERNEL_LAYERS)
def test_the_bound_pass_reuses_the_projections_certificate(factory, shape):
    layer = _built(factory, shape)
    layer.kernel.assign(layer.kernel * 3.0)
    layer.project()
    counted = _Counted(layer)
    remembered = float(layer.lipschitz_bound())
    assert counted.calls == 0  # no Gram iteration: the projection's number
    assert remembered == pytest.approx(_fresh(layer), rel=1e-4)


@pytest.mark.parametrize("factory, shape", KERNEL_LAYERS)
def test_any_change_of_the_kernel_is_certified_again(factory, shape):
    layer = _built(factory, shape)
    counted = _Counted(layer)
    # one entry moved by one unit in the last place
    kernel = layer.kernel.numpy()
    flat = kernel.reshape(-1)
    flat[0] = np.nextafter(flat[0], np.float32(np.inf))
    layer.kernel.assign(kernel)
    assert float(layer.lipschitz_bound()) == _fresh(layer)
    assert counted.calls == 2  # the bound pass certified; so did _fresh
    # three times the kernel: three times the certificate
    before = _fresh(layer)
    layer.kernel.assign(layer.kernel * 3.0)
    assert float(layer.lipschitz_bound()) == pytest.approx(3 * before, rel=1e-5)


def test_an_assignment_in_the_same_graph_is_seen_by_the_bound():
    layer = _built(*KERNEL_LAYERS[3])
    before = float(layer.lipschitz_bound())

    @tf.function
    def scale_then_bound():
        layer.kernel.assign(layer.kernel * 2.0)
        return layer.lipschitz_bound()

    assert float(scale_then_bound()) == pytest.approx(2 * before, rel=1e-5)


def test_a_forged_pair_is_served_only_for_its_own_kernel():
    """A certificate stored for another kernel (here 1e-3 for a kernel of
    norm 3) is never served for the layer's kernel."""
    layer = _built(*KERNEL_LAYERS[0])
    layer.kernel.assign(layer.kernel * 3.0)
    layer._certified.store(tf.zeros_like(layer.kernel), tf.constant(1e-3))
    assert float(layer.lipschitz_bound()) == pytest.approx(3.0, rel=1e-3)


def test_nan_never_matches():
    cache = CertifiedKernel(3, "float32", "probe")
    kernel = tf.constant([1.0, float("nan"), 2.0])
    cache.store(kernel, tf.constant(np.nan, tf.float32))
    assert float(cache.lookup(kernel, lambda k: tf.constant(5.0))) == 5.0
    fresh = CertifiedKernel(3, "float32", "probe_fresh")  # nothing certified yet
    assert float(fresh.lookup(tf.zeros(3), lambda k: tf.constant(7.0))) == 7.0


@pytest.mark.parametrize(
    "stored, looked_up",
    [
        ([1e-40, 0.5], [3e-40, 0.5]),  # subnormals a cast to float64 may flush
        ([0.0, 0.5], [-0.0, 0.5]),
        ([1.0, 0.5], [np.nextafter(np.float32(1), np.float32(2)), 0.5]),
    ],
)
def test_the_comparison_is_of_bytes(stored, looked_up):
    cache = CertifiedKernel(2, "float32", "probe_bytes")
    cache.store(tf.constant(np.float32(stored)), tf.constant(0.5))
    fresh = cache.lookup(tf.constant(np.float32(looked_up)), lambda k: tf.constant(9.0))
    assert float(fresh) == 9.0
    assert float(cache.lookup(tf.constant(np.float32(looked_up)), None)) == 9.0


def test_a_certificate_is_stored_only_as_float32():
    cache = CertifiedKernel(2, "float32", "probe_dtype")
    with pytest.raises(TypeError, match="float32"):
        cache.store(tf.zeros(2), tf.constant(0.5, tf.float64))


def test_the_remembered_certificate_is_never_saved_or_loaded(tmp_path):
    model = dp_model(small_cnn(), sampling="shuffle", n=100)
    for layer in model.dp_layers:
        if hasattr(layer, "_certified"):
            assert all("certified" not in v.path for v in layer.weights)
    path = tmp_path / "model.keras"
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        names = " ".join(archive.namelist())
        weights = b"".join(archive.read(n) for n in archive.namelist())
    assert b"certified" not in weights and "certified" not in names
    prefix = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    names = [name for name, _ in tf.train.list_variables(prefix)]
    assert not [n for n in names if "certified" in n]


def test_loaded_weights_are_certified_again(tmp_path):
    """Weights loaded from a model whose kernels are 3x larger: the bounds are
    those of the loaded kernels, not the remembered ones."""
    model = dp_model(small_cnn(), sampling="shuffle", n=100)
    other = dp_model(small_cnn(), sampling="shuffle", n=100)
    for layer in other.dp_layers:
        if hasattr(layer, "kernel"):
            layer.kernel.assign(layer.kernel * 3.0)
    other.save_weights(tmp_path / "big.weights.h5")
    before = {k: float(v) for k, v in model.compute_gradient_bounds().items()}
    model.load_weights(tmp_path / "big.weights.h5")
    after = {k: float(v) for k, v in model.compute_gradient_bounds().items()}
    fresh = {
        layer.name: _fresh(layer)
        for layer in model.dp_layers
        if hasattr(layer, "kernel")
    }
    assert all(value == pytest.approx(3.0, rel=1e-3) for value in fresh.values())
    first_kernel = next(k for k in after if "conv" in k)
    assert after[first_kernel] == pytest.approx(3 * before[first_kernel], rel=1e-3)


def test_after_training_the_bounds_use_certificates_of_the_trained_kernels():
    """Steps with a large learning rate: each remembered certificate bounds the
    exact norm of the kernel the bound pass reads, and it is the projection's,
    not a stale one."""
    model = fitted_with_large_steps()
    dense = model.dp_layers[-1]
    exact = np.linalg.norm(np.asarray(dense.kernel, np.float64), 2)
    counted = _Counted(dense)
    remembered = float(dense.lipschitz_bound())
    assert counted.calls == 0
    assert exact <= remembered == pytest.approx(_fresh(dense), rel=1e-4)
    conv = model.dp_layers[1]
    counted = _Counted(conv)
    assert float(conv.lipschitz_bound()) == pytest.approx(_fresh(conv), rel=1e-4)
    assert counted.calls == 1  # only _fresh ran a Gram iteration


def test_64_bit_kernels_are_remembered_and_16_bit_ones_always_certified():
    calls = []

    def certify(kernel):
        calls.append(kernel.dtype)
        return tf.constant(1.0)

    for dtype, expected in [("float64", 1), ("float16", 3)]:
        calls.clear()
        cache = CertifiedKernel(2, dtype, f"probe_{dtype}")
        kernel = tf.constant([1.0, 2.0], dtype)
        for _ in range(3):
            assert float(cache.lookup(kernel, certify)) == 1.0
        assert len(calls) == expected, dtype

"""Fixtures of the deel-lipdp compatibility tests: a small MNIST-like `.npz`
generated in `tmp_path` (nothing is downloaded, nothing read from outside)."""

import numpy as np
import pytest


def write_mnist_like(path, n_train=300, n_test=60, seed=0):
    """Random 28x28 uint8 images with integer labels, in keras' mnist.npz
    layout (x_train, y_train, x_test, y_test)."""
    rng = np.random.default_rng(seed)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        y_train=rng.integers(0, 10, n_train).astype(np.uint8),
        x_test=rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        y_test=rng.integers(0, 10, n_test).astype(np.uint8),
    )
    return path


@pytest.fixture
def mnist_npz(tmp_path):
    """Path of a generated 300 + 60 sample MNIST-layout `.npz`."""
    return write_mnist_like(tmp_path / "mnist.npz")

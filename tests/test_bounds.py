"""The bound pass: one certificate per kernel layer per pass, never a stale one."""

import numpy as np
import pytest

from deel_lipdp_ext import layers as L
from deel_lipdp_ext.layers.base import KernelLayer

from .helpers import dp_model, small_cnn


def test_each_certificate_is_computed_once_per_pass(monkeypatch):
    """Forward and backward passes both need it; the Gram iteration runs once
    (kernels changed since their projection, so none is remembered)."""
    model = dp_model(small_cnn())
    calls = []
    for cls in {type(x) for x in model.dp_layers if isinstance(x, KernelLayer)}:

        def counting(self, kernel, _certificate=cls._certificate):
            calls.append(self.name)
            return _certificate(self, kernel)

        monkeypatch.setattr(cls, "_certificate", counting)
    kernel_layers = [x for x in model.dp_layers if isinstance(x, KernelLayer)]
    for layer in kernel_layers:
        layer.kernel.assign(layer.kernel * 2.0)
    model.compute_gradient_bounds()
    assert len(kernel_layers) == 2
    assert sorted(calls) == sorted(x.name for x in kernel_layers)


def test_certificates_follow_the_weights_between_passes():
    model = dp_model(
        [
            L.DP_BoundedInput(upper_bound=1.0),
            L.DP_Flatten(),
            L.DP_QuickSpectralDense(8),
            L.DP_QuickSpectralDense(10),
        ]
    )
    first = model.dp_layers[2]
    before = {k: float(v) for k, v in model.compute_gradient_bounds().items()}
    lip_before = float(first.lipschitz_bound())
    first.kernel.assign(first.kernel * 3.0)
    assert float(first.lipschitz_bound()) == pytest.approx(3 * lip_before, rel=1e-5)
    after = {k: float(v) for k, v in model.compute_gradient_bounds().items()}
    last = model.dp_layers[3].kernel.path
    # the last layer's input bound scales with the first layer's certificate
    assert after[last] == pytest.approx(3 * before[last], rel=1e-4)
    assert np.isfinite(list(after.values())).all()

"""Under jit_compile=True a DP train step compiles once per batch shape.

A ledger read by `table[index]` made every ledger value a compile-time
constant of the XLA cluster: the whole train step recompiled at every step
(~1 s each on CPU). Counted from XLA's own log in a fresh process (the log
level must be set before TensorFlow loads).
"""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import keras, numpy as np
    from deel_lipdp_ext import DPParameters, losses
    from deel_lipdp_ext import layers as L
    from deel_lipdp_ext.dpsgd import DPSGDModel
    from tests.helpers import dp_model, metadata

    kind = {kind!r}
    x = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32) / 3
    y = np.eye(4, dtype=np.float32)[[0, 1, 2, 3] * 2]
    if kind == "clipless":
        model = dp_model(
            [L.DP_BoundedInput(upper_bound=1.0), L.DP_QuickSpectralDense(4)],
            input_shape=(8,), num_classes=4, batch_size=8, n=100,
            loss=losses.DP_TauCategoricalCrossentropy(1.0), jit_compile=True,
        )
    else:
        net = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
        model = DPSGDModel(net, DPParameters(1.0, 1e-5, seed=0),
                           metadata((8,), 4, n=100, batch_size=8), l2_norm_clip=1.0,
                           **{extra})
        model.compile(keras.optimizers.SGD(0.1),
                      keras.losses.CategoricalCrossentropy(from_logits=True),
                      jit_compile=True)
    for _ in range(5):
        model.train_on_batch(x, y)
    print("steps", int(model.privacy_plan.steps.numpy()))
    """
)


@pytest.mark.parametrize(
    "kind,extra",
    [("clipless", "{}"), ("dpsgd", "{}"), ("dpsgd", "{'clipping': 'ghost'}")],
    ids=["clipless", "dpsgd-vectorized", "dpsgd-ghost"],
)
def test_an_xla_train_step_compiles_once_for_one_batch_shape(kind, extra):
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "0",
        "TF_CPP_VMODULE": "device_compiler=1",
    }
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(kind=kind, extra=extra)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "steps 5" in done.stdout
    compilations = done.stderr.count("Compilation of XLA executable")
    assert compilations == 1, f"{compilations} XLA compilations for 5 steps"

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

# Four logical CPU devices, set before TensorFlow initialises its devices, for
# the tf.distribute tests (tests/test_distribute.py); every other test runs on
# the first, as without them.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * 4,
)

import itertools  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from deel_lipdp_ext import privacy_plan  # noqa: E402

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=15,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seed(monkeypatch):
    """Every test starts from the same seeds whatever ran before it (on
    whichever xdist worker): Keras, NumPy, and the count of seeded noise
    streams (`DPParameters(seed=...)` derives a model's noise key from it)."""
    keras.utils.set_random_seed(0)
    np.random.seed(0)
    monkeypatch.setattr(privacy_plan, "_SEEDED_PLANS", itertools.count())
    yield

"""Clipless DP training on scikit-learn's bundled digits, epsilon <= 3.

python examples/digits_clipless.py
"""

import keras

from deel_lipdp_ext import DPParameters, DPSequential, callbacks, layers, losses
from deel_lipdp_ext.data import load_digits_dataset
from deel_lipdp_ext.sensitivity import gradient_norm_check

EPOCHS, TARGET_EPSILON, DELTA = 30, 3.0, 1e-5

keras.utils.set_random_seed(0)  # the weights' initialisation; noise stays secret
# Full batches (q = 1): on 1437 samples, large batches give the best signal/noise.
train, test, meta = load_digits_dataset(batch_size=1437, input_bound=1.0)
model = DPSequential(
    [
        keras.Input(meta.input_shape),
        layers.DP_BoundedInput(upper_bound=1.0),
        layers.DP_SpectralConv2D(8, 2, strides=2, padding="valid"),  # orthogonal, GNP
        layers.DP_GroupSort(2),
        layers.DP_Flatten(),
        layers.DP_QuickSpectralDense(meta.num_classes),
    ],
    dp_parameters=DPParameters(noise_multiplier=1.0, delta=DELTA),
    dataset_metadata=meta,
)
# Calibrate the mechanism this model runs (its privacy plan), then use it.
sigma = model.privacy_plan.calibrate_noise_multiplier(TARGET_EPSILON, EPOCHS)
model.set_noise_multiplier(sigma)
model.compile(
    optimizer=keras.optimizers.SGD(0.3, momentum=0.9),
    loss=losses.DP_TauCategoricalCrossentropy(tau=16.0),
    metrics=["accuracy"],
)
history = model.fit(
    train,
    epochs=EPOCHS,
    validation_data=test,
    verbose=2,
    callbacks=[callbacks.DP_Accountant(epsilon_budget=TARGET_EPSILON * 1.0001)],
)
print(
    f"sigma={sigma:.3f}  epsilon={history.history['epsilon'][-1]:.3f}  "
    f"test accuracy={history.history['val_accuracy'][-1]:.3f}"
)
print(gradient_norm_check(model, train, max_batches=1).table())

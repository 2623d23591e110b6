"""Clipless DP training on scikit-learn's bundled digits, epsilon <= 3.

The layers of `deel_lipdp_ext.models.recipe("small_cnn", 1437)` (what
`lipdp demo` trains), written out:

python examples/digits_clipless.py
"""

import keras

from deel_lipdp_ext import DPParameters, DPSequential, callbacks, layers, losses
from deel_lipdp_ext.data import load_digits_dataset
from deel_lipdp_ext.sensitivity import gradient_norm_check

EPOCHS, TARGET_EPSILON, DELTA, ACCOUNTANT = 30, 3.0, 1e-5, "pld"

keras.utils.set_random_seed(0)  # the weights' initialisation; noise stays secret
# Poisson batches of expected size 512 (q = 0.36) from the 1437 training digits,
# each image scaled to L2 norm 1.
train, test, meta = load_digits_dataset(batch_size=512, input_bound=1.0)
model = DPSequential(
    [
        keras.Input(meta.input_shape),
        layers.DP_BoundedInput(upper_bound=1.0),
        # 2x2 patches, stride 2: an orthogonal (norm-preserving) embedding of
        # each patch. Its kernel gradient sums 16 patch terms that partly
        # cancel, so it uses little of its bound: a larger share of the noise
        # (nm_coef) leaves more of the privacy budget to the head.
        layers.DP_SpectralConv2D(8, 2, strides=2, padding="valid", nm_coef=4.0),
        layers.DP_GroupSort(2),
        layers.DP_Flatten(),
        layers.DP_QuickSpectralDense(meta.num_classes),
        # Loss-gradient clipping: every bound scales with 0.05, not with the
        # loss's Lipschitz constant.
        layers.DP_ClipGradient(0.05),
    ],
    dp_parameters=DPParameters(1.0, DELTA, noisify_strategy="per-layer"),
    dataset_metadata=meta,
)
# Calibrate the mechanism this model runs (its privacy plan), then use it.
sigma = model.privacy_plan.calibrate_noise_multiplier(
    TARGET_EPSILON, EPOCHS, ACCOUNTANT
)
model.set_noise_multiplier(sigma)
steps = EPOCHS * meta.nb_steps_per_epoch
model.compile(
    optimizer=keras.optimizers.Adam(
        keras.optimizers.schedules.CosineDecay(0.02, steps)
    ),
    loss=losses.DP_TauCategoricalCrossentropy(tau=64.0),
    metrics=["accuracy"],
)
history = model.fit(
    train,
    epochs=EPOCHS,
    validation_data=test,
    verbose=2,
    callbacks=[
        callbacks.DP_Accountant(ACCOUNTANT, epsilon_budget=TARGET_EPSILON * 1.0001)
    ],
)
print(
    f"sigma={sigma:.3f}  epsilon={history.history['epsilon'][-1]:.3f}  "
    f"test accuracy={history.history['val_accuracy'][-1]:.3f}"
)
# Tightness on TEST data (on training data it would be a release without noise).
print(gradient_norm_check(model, test, max_batches=2).table())

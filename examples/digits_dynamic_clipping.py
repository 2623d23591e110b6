"""Dynamic clipping of the loss gradient on the bundled digits, and what it costs.

The model's last layer clips each sample's loss gradient; the Laplace SVT
callback privately picks its value every 5 epochs (0.1-DP each), and
`DP_Accountant` reports the epsilon of the gradient steps AND of those picks.

python examples/digits_dynamic_clipping.py
"""

import keras

from deel_lipdp_ext import DPParameters, DPSequential, callbacks, layers, losses
from deel_lipdp_ext.accounting import epsilon_curve
from deel_lipdp_ext.data import load_digits_dataset

EPOCHS, SIGMA, DELTA = 20, 4.0, 1e-5

keras.utils.set_random_seed(0)
train, test, meta = load_digits_dataset(batch_size=256, input_bound=1.0)
model = DPSequential(
    [
        keras.Input(meta.input_shape),
        layers.DP_BoundedInput(upper_bound=1.0),
        layers.DP_SpectralConv2D(8, 2, strides=2, padding="valid"),
        layers.DP_GroupSort(2),
        layers.DP_Flatten(),
        layers.DP_QuickSpectralDense(meta.num_classes),
        layers.DP_ClipGradient(clip_value=1.0, mode="dynamic"),
    ],
    dp_parameters=DPParameters(noise_multiplier=SIGMA, delta=DELTA, seed=0),
    dataset_metadata=meta,
)
model.compile(
    optimizer=keras.optimizers.SGD(0.3, momentum=0.9),
    loss=losses.DP_TauCategoricalCrossentropy(tau=16.0),
    metrics=["accuracy"],
)
clipping = callbacks.LaplaceAdaptiveLossGradientClipping(
    train, patience=5, epsilon=0.1, quantile=0.9, seed=0
)
print("planned epsilon per epoch:", epsilon_curve(model, EPOCHS, schedules=[clipping]))
history = model.fit(
    train,
    epochs=EPOCHS,
    validation_data=test,
    verbose=0,
    callbacks=[clipping, callbacks.DP_Accountant()],
)
print(f"{'epoch':>5} {'clip':>7} {'epsilon':>8} {'val acc':>8}")
logs = history.history
for e in range(EPOCHS):
    print(
        f"{e + 1:5d} {logs['clip_value'][e]:7.4f} "
        f"{logs['epsilon'][e]:8.4f} {logs['val_accuracy'][e]:8.3f}"
    )
print("releases:", model.privacy_ledger)

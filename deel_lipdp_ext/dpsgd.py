"""Classical DP-SGD (per-example clipping) as a Keras 3 model wrapper.

The baseline the clipless models are measured against (Abadi et al. 2016):
each step computes every example's gradient (vectorised with
``tf.vectorized_map``, not a Python loop), scales it to L2 norm at most ``l2_norm_clip``
(norm over all trainable variables together), sums the clipped gradients,
adds Gaussian noise of std ``noise_multiplier * l2_norm_clip`` per coordinate
and divides by the *expected* batch size B (never the actual one: a short or
Poisson batch cannot raise an example's weight above ``1 / B``).

Noise, the division by B and the accounting go through the same privacy plan
as the clipless models' (one Poisson-subsampled Gaussian at ``q = B / N`` per
step, recorded in the ledger as it runs), so ``callbacks.DP_Accountant``
reports its epsilon unchanged. An example whose gradient is not finite (an
input that overflows in the forward pass) is dropped from the step.

Example:
    >>> from deel_lipdp_ext import DatasetMetadata, DPParameters, callbacks
    >>> net = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
    >>> meta = DatasetMetadata((64,), num_classes=10, nb_samples_train=1000,
    ...                        nb_samples_test=0, batch_size=100)
    >>> model = DPSGDModel(net, DPParameters(1.1, 1e-5), meta, l2_norm_clip=1.0)
    >>> model.compile(keras.optimizers.SGD(0.1), keras.losses.CategoricalCrossentropy())
    >>> model.fit(ds_train, epochs=5,  # doctest: +SKIP
    ...           callbacks=[callbacks.DP_Accountant()])
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf
from keras.src.losses.loss import squeeze_or_expand_to_same_rank

from . import losses as dp_losses
from ._keras_utils import all_sublayers, per_example_map, pop_keras_objects
from ._validation import real_or_nan, require_one_of
from .data import DatasetMetadata
from .ghost_clipping import clipped_gradient_sum, ghost_clipping_support
from .layers.base import BOUND_MARGIN, example_squares
from .model import (
    DPParameters,
    PrivateModel,
    check_float32_compute,
    refuse_nested_batch,
    refuse_regularizers,
    sanitize_batch,
)

_PACKAGE = "deel_lipdp_ext"
CLIPPINGS = ("auto", "ghost", "vectorized")
_SAMPLE_MIXING = (keras.layers.BatchNormalization,)
#: Smallest `l2_norm_clip`. TensorFlow's CPU kernels flush squares below
#: 2^-126 to zero, so a computed norm can miss up to n * 2^-126 of a squared
#: norm (n: parameters); above this C that is below the 1e-6 clip margin for
#: any n up to 1e12 (a review clipped nothing at C = 1e-25).
MIN_L2_NORM_CLIP = 1e-10
#: Losses whose value for one example depends on that example alone (with an
#: axis off the batch: `_refuse_batch_axis`): the Keras losses but Circle
#: (which compares the examples of a batch), as classes and functions, and
#: this library's DP losses. Ghost clipping differentiates the batch's summed
#: loss, so it needs one of them; any other loss (one's own function or
#: class included) runs on the vectorised path, which evaluates each example
#: alone (a review measured 64 C for one example under Circle at B = 128).
#: Not Hinge nor SquaredHinge: Keras maps labels {0, 1} to {-1, 1} only if
#: every label of the batch is 0 or 1, so one label of 0.5 changed every
#: other example's loss (10.9 C for one example at B = 64, a review).
PER_EXAMPLE_LOSSES = tuple(
    getattr(keras.losses, name)
    for name in (
        "BinaryCrossentropy BinaryFocalCrossentropy CTC CategoricalCrossentropy "
        "CategoricalFocalCrossentropy CategoricalGeneralizedCrossEntropy "
        "CategoricalHinge CosineSimilarity Dice Huber KLDivergence LogCosh "
        "MeanAbsoluteError MeanAbsolutePercentageError MeanSquaredError "
        "MeanSquaredLogarithmicError Poisson SparseCategoricalCrossentropy "
        "Tversky"
    ).split()
    if hasattr(keras.losses, name)
) + tuple(
    cls
    for cls in vars(dp_losses).values()
    if isinstance(cls, type)
    and issubclass(cls, dp_losses.DPLoss)
    and cls is not dp_losses.DPLoss
)
PER_EXAMPLE_LOSS_FUNCTIONS = tuple(
    getattr(keras.losses, name)
    for name in (
        "binary_crossentropy binary_focal_crossentropy categorical_crossentropy "
        "categorical_focal_crossentropy categorical_generalized_cross_entropy "
        "categorical_hinge cosine_similarity ctc dice huber kl_divergence "
        "log_cosh mean_absolute_error mean_absolute_percentage_error "
        "mean_squared_error mean_squared_logarithmic_error poisson "
        "sparse_categorical_crossentropy tversky"
    ).split()
    if hasattr(keras.losses, name)
)


def loss_problem(loss) -> str | None:
    """None if `loss` (a Keras loss, its name, or a function) computes each
    example's value from that example alone (`PER_EXAMPLE_LOSSES`), else why
    ghost clipping cannot use it."""
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if any(loss is f for f in PER_EXAMPLE_LOSS_FUNCTIONS):
        return None
    # an allowed class, as its class defines it: no method replaced on the
    # instance, no other function wrapped (reviews: an MSE whose fn centred
    # the batch, 3.19 C; a DP loss whose _labels did, 2.75 C)
    function = getattr(loss, "fn", None)
    replaced = [
        name
        for name, value in vars(loss).items()
        if callable(value) and callable(getattr(type(loss), name, None))
    ]
    if (
        type(loss) in PER_EXAMPLE_LOSSES
        and not replaced
        and (function is None or any(function is f for f in PER_EXAMPLE_LOSS_FUNCTIONS))
    ):
        return None
    name = getattr(loss, "__name__", type(loss).__name__)
    return (
        f"the loss {name} is not known to compute each example's value from "
        "that example alone (ghost clipping differentiates the batch's summed "
        "loss)"
    )


def _check_network(model: keras.Model, probe: bool = True) -> None:
    """Refuse layers that mix the examples of a batch, compute in another dtype
    than float32, or (probe: an eager forward pass) write non-trainable state
    in training. Run at construction, and again once the network is built (a
    lazily built network creates its sublayers then)."""
    for kind in ("inputs", "outputs"):
        tensors = getattr(model, kind, None) if model.built else None
        if tensors is not None and len(tensors) > 1:
            raise ValueError(
                f"The network has {len(tensors)} {kind}: DPSGDModel trains "
                "networks with one input and one output (the per-example "
                "checks and clipping hold for one tensor each)."
            )
    for layer in all_sublayers(model):
        if isinstance(layer, _SAMPLE_MIXING):
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) mixes the examples "
                "of a batch: per-example gradients would not be per example."
            )
        if isinstance(layer, keras.layers.TimeDistributed) and any(
            t.shape[1] is None
            for node in getattr(layer, "_inbound_nodes", [])
            for t in node.input_tensors[:1]
        ):
            raise ValueError(
                f"Layer {layer.name!r} (TimeDistributed) runs over an unknown "
                "number of steps: Keras then maps its layer over as many steps "
                "as the batch has examples (shape[0] read before the transpose), "
                "so one example's pass would use its first step alone and a "
                "batch's steps would depend on its size. Give the time axis a "
                "static size in the model's input."
            )
        if getattr(layer, "stateful", False):
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) is stateful: it "
                "carries state computed from one step's examples into the next "
                "steps, without noise. Use stateful=False."
            )
    refuse_regularizers([model, *all_sublayers(model)], "DPSGDModel")
    check_float32_compute([model, *all_sublayers(model)], "DPSGDModel")
    if probe:
        _refuse_training_state(model)


def _refuse_training_state(model: keras.Model) -> None:
    """Refuse a model whose training forward pass writes a non-trainable
    variable (a batch statistic, a counter...): that write would be a release
    of the data without noise. Probed on a zero batch when the input shape is
    known; the variables are restored afterwards.

    Raises:
        ValueError: naming the variables the training pass changed.
    """
    inputs = getattr(model, "inputs", None)
    if not model.built or not inputs or None in tuple(inputs[0].shape[1:]):
        return
    # Random-number generators' states (Dropout's) move in training: public.
    state = [
        (v, v.numpy().copy())
        for v in model.non_trainable_variables
        if "seed_generator" not in v.path
    ]
    probe = tf.random.stateless_normal((2, *inputs[0].shape[1:]), seed=(0, 1))
    model(probe, training=True)
    changed = [v.path for v, before in state if not np.array_equal(v.numpy(), before)]
    for v, before in state:
        v.assign(before)
    if changed:
        raise ValueError(
            "The model's training pass writes non-trainable state computed from "
            f"the data, which DP-SGD would release without noise: {changed}"
        )


def _refuse_batch_axis(loss: keras.losses.Loss, y_pred: tf.Tensor) -> None:
    """Refuse a Keras loss that reduces over the batch axis (e.g.
    `CosineSimilarity(axis=0)`): each example's loss would depend on the
    others, and one example would move every other example's gradient (a
    review measured 3.9 C against a replace-one bound of 2 C).

    Raises:
        ValueError: naming the loss and its axis.
    """
    kwargs = getattr(loss, "_fn_kwargs", None) or {}
    axis = kwargs.get("axis", getattr(loss, "axis", None))
    if axis is None:
        return
    rank = y_pred.shape.rank
    axes = axis if isinstance(axis, list | tuple) else [axis]
    if rank is None or any(int(a) % rank == 0 for a in axes):
        raise ValueError(
            f"The loss {type(loss).__name__} reduces over axis={axis}, the batch "
            f"axis of predictions of rank {rank}: each example's loss would "
            "depend on the other examples, and per-example clipping would not "
            "bound one example's effect. Use a per-example axis (-1)."
        )


#: Losses whose labels have one axis fewer than the predictions (class ids,
#: CTC label sequences), as classes and as the functions they wrap.
_SPARSE_LABEL_LOSSES = tuple(
    getattr(keras.losses, name)
    for name in (
        "SparseCategoricalCrossentropy CategoricalGeneralizedCrossEntropy CTC "
        "sparse_categorical_crossentropy categorical_generalized_cross_entropy ctc"
    ).split()
    if hasattr(keras.losses, name)
)


def _refuse_label_broadcast(loss: keras.losses.Loss, y, y_pred) -> None:
    """Refuse dense labels of another rank than the predictions (both given
    after Keras's squeeze of a size-1 last axis): labels (B,) against predictions
    (B, K) broadcast along the class axis, so that every example's loss read
    every example's label (a review: 44.7 C for one example under ghost
    clipping at B = 32 with MSE). A batch of one (the vectorised path's
    one-example pass) cannot mix examples.

    Raises:
        ValueError: naming the loss and both shapes.
    """
    function = getattr(loss, "fn", loss)
    if type(loss) in _SPARSE_LABEL_LOSSES or any(
        function is f for f in _SPARSE_LABEL_LOSSES
    ):
        return
    if y.shape.rank == y_pred.shape.rank or y.shape[:1] == (1,):
        return
    raise ValueError(
        f"The loss {getattr(loss, '__name__', type(loss).__name__)} gets "
        f"labels of shape {y.shape} for "
        f"predictions of shape {y_pred.shape}: broadcast together, each "
        "example's loss would read the other examples' labels, and per-example "
        "clipping would not bound one example's effect. Give labels of the "
        "predictions' shape (e.g. one-hot), or use a sparse loss."
    )


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DPSGDModel(PrivateModel, keras.Model):
    """Wraps any Keras model to train it with per-example clipped, noised SGD.

    Args:
        model: the Keras model (any layers but those that mix examples, such as
            BatchNormalization, which would make one example's gradient depend
            on the others).
        dp_parameters: ``DPParameters`` (noise multiplier sigma, delta);
            ``noisify_strategy`` must be ``"global"``.
        dataset_metadata: ``DatasetMetadata``: expected batch size B, sampling
            rate q and steps per epoch, as for the clipless models.
        l2_norm_clip: C, the bound on each example's gradient norm (> 0).
        report_train_metrics: put the training batches' loss and metrics in the
            logs (computed without noise: the epsilon does not cover them).
        clipping: how per-example gradients are clipped. "ghost": from one
            batched forward and backward pass, per-example norms without
            per-example gradients (`ghost_clipping`; Keras built-in layers
            only). "vectorized": every example's gradient by
            `tf.vectorized_map` (any layers). "auto" (default): "ghost" where
            it is exact for the network, else "vectorized". Both clip the
            same per-example gradients.

    Raises:
        TypeError: wrong argument types.
        ValueError: a clip norm below `MIN_L2_NORM_CLIP`, a per-layer noise
            strategy, a layer that mixes examples or is stateful, a
            regularizer, a loss without per-example values, or
            clipping="ghost" for a network or (at compile) a loss it does
            not support (the reason is named).
    """

    def __init__(
        self,
        model: keras.Model,
        dp_parameters: DPParameters,
        dataset_metadata: DatasetMetadata,
        l2_norm_clip: float,
        report_train_metrics: bool = False,
        clipping: str = "auto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        require_one_of("clipping", clipping, CLIPPINGS, "DPSGDModel")
        if not isinstance(model, keras.Model):
            raise TypeError(
                f"`model` must be a Keras model. Received: {type(model).__name__}"
            )
        if not isinstance(dp_parameters, DPParameters):
            raise TypeError(
                "`dp_parameters` must be DPParameters. "
                f"Received: {type(dp_parameters).__name__}"
            )
        if not isinstance(dataset_metadata, DatasetMetadata):
            raise TypeError(
                "`dataset_metadata` must be DatasetMetadata. "
                f"Received: {type(dataset_metadata).__name__}"
            )
        if dp_parameters.noisify_strategy != "global":
            raise ValueError(
                "DP-SGD clips the whole per-example gradient: noisify_strategy must "
                f"be 'global'. Received: {dp_parameters.noisify_strategy!r}"
            )
        if not model.built:  # its sublayers exist once built: check them all
            model.build((None, *dataset_metadata.input_shape))
        _check_network(model)
        self.model = model
        self.l2_norm_clip = l2_norm_clip
        self.clipping = clipping
        self._check_clipping()
        self._init_privacy(
            dp_parameters,
            dataset_metadata,
            report_train_metrics=report_train_metrics,
        )
        self._claim_network()
        if model.built:  # the wrapper owns no weights of its own to build
            self.built = True

    # ------------------------------------------------------------- training
    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def build(self, input_shape):
        if not self.model.built:
            self.model.build(input_shape)
            _check_network(self.model)
            self._check_clipping()
            self._claim_network()
        self.built = True

    def _claim_network(self) -> None:
        """Claim the network and its layers (`PrivateModel._claim`): a second
        DPSGDModel around a network this one trained would forget its steps."""
        self._claim([self.model, *all_sublayers(self.model)])

    @property
    def clipping_method(self) -> str:
        """The clipping that runs: "ghost" or "vectorized" ("auto" resolved
        for this network)."""
        if self.clipping == "auto":
            return "ghost" if self._ghost_problem() is None else "vectorized"
        return self.clipping

    def _ghost_problem(self) -> str | None:
        """Why ghost clipping is not exact for the network and the loss
        (once compiled), or None."""
        problem = ghost_clipping_support(self.model)
        loss = getattr(self, "loss", None)
        if problem is None and loss is not None:
            problem = loss_problem(loss)
        return problem

    def _check_clipping(self) -> None:
        if self.clipping != "ghost" or not self.model.built:
            return
        reason = self._ghost_problem()
        if reason is not None:
            raise ValueError(
                f"clipping='ghost' is not exact for this network: {reason}. Use "
                "clipping='vectorized' (or 'auto', which picks it)."
            )

    def _per_example_losses(self, y, y_pred) -> tf.Tensor:
        loss = self.loss
        if isinstance(loss, str):
            loss = keras.losses.get(loss)
        # Squeezed once, as Keras's wrapper does before calling a function
        # (poisson, kl_divergence and categorical_hinge do not: (B,) labels
        # against (B, 1) predictions broadcast to (B, B), every loss reading
        # every label; a review: up to 16.2 C); a Loss's call squeezes alike.
        y_same, y_pred_same = squeeze_or_expand_to_same_rank(y, y_pred)
        if callable(loss):
            _refuse_label_broadcast(loss, y_same, y_pred_same)
        if isinstance(loss, keras.losses.Loss):
            # the axis is read on the predictions the loss sees: a Keras loss
            # squeezes them first ((B, T, 1) to (B, T): axis -2 became the
            # batch; a review: 4.38 C for one example)
            _refuse_batch_axis(loss, y_pred)
            _refuse_batch_axis(loss, y_pred_same)
            values = loss.call(y, y_pred)
        elif callable(loss):
            values = loss(y_same, y_pred_same)
        else:
            raise ValueError(
                f"DPSGDModel needs one loss (a Keras loss or a function of "
                f"(y_true, y_pred)). Received: {loss!r}"
            )
        values = tf.convert_to_tensor(values)
        if values.shape.rank != 1 or values.shape[0] not in (None, y_pred.shape[0]):
            raise ValueError(
                "The loss must return one value per example (shape (batch,)) so "
                "each example's gradient can be clipped. Received: shape "
                f"{values.shape} for predictions of shape {y_pred.shape}"
            )
        return values

    def per_example_gradients(
        self, x, y
    ) -> tuple[list[tf.Tensor], tf.Tensor, tf.Tensor]:
        """Every example's gradient, vectorised (``tf.vectorized_map`` over the
        examples of a one-example forward and backward pass).

        Returns:
            ``(gradients, y_pred, losses)``: one ``(batch, *variable.shape)``
            tensor per trainable variable (the gradient of example i's loss;
            zeros for a variable the loss does not reach), the predictions and
            the per-example losses ``(batch,)``.
        """
        variables = self.model.trainable_variables

        def one_example(example):
            xi, yi = example
            with tf.GradientTape() as tape:
                prediction = self.model(xi[None], training=True)
                loss = tf.reduce_sum(self._per_example_losses(yi[None], prediction))
            gradients = tape.gradient(
                loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
            return gradients, prediction[0], loss

        # An empty (Poisson) batch runs one zero row, dropped after: the
        # loop TensorFlow falls back to for some gradients (a convolution's
        # kernel) cannot stack zero examples, and the step failed.
        x, y = tf.nest.map_structure(tf.convert_to_tensor, (x, y))
        count = tf.shape(tf.nest.flatten(x)[0])[0]
        padded = tf.nest.map_structure(
            lambda t: tf.pad(
                t, [[0, tf.maximum(1 - count, 0)]] + [[0, 0]] * (t.shape.rank - 1)
            ),
            (x, y),
        )
        gradients, y_pred, losses = per_example_map(one_example, padded, "DPSGDModel")
        return [g[:count] for g in gradients], y_pred[:count], losses[:count]

    def clip_per_example(self, gradients: list[tf.Tensor]) -> tuple[list, tf.Tensor]:
        """Scales each example's gradient to norm at most C (aims at C (1 - 1e-6)).

        An example whose gradient has a NaN or Inf (its forward pass
        overflowed) is zeroed: it contributes nothing rather than NaN.

        Returns:
            ``(clipped gradients, norms before clipping (batch,))``; the norm is
            over all variables together.
        """
        finite = tf.reduce_all(
            tf.stack(
                [
                    tf.reduce_all(
                        tf.math.is_finite(tf.reshape(g, (tf.shape(g)[0], -1))), axis=1
                    )
                    for g in gradients
                ]
            ),
            axis=0,
        )
        gradients = [
            tf.where(
                tf.reshape(finite, [-1] + [1] * (len(g.shape) - 1)), g, tf.zeros_like(g)
            )
            for g in gradients
        ]
        squares = [example_squares(g) for g in gradients]
        norms = tf.sqrt(tf.add_n(squares))
        # Aims at C * BOUND_MARGIN, as ghost clipping does: float32 rounding
        # of the norm and of the product left up to C (1 + 1e-7).
        limit = self.l2_norm_clip * BOUND_MARGIN
        scale = tf.minimum(1.0, limit / tf.maximum(norms, 1e-12))
        clipped = [
            g * tf.reshape(tf.cast(scale, g.dtype), [-1] + [1] * (len(g.shape) - 1))
            for g in gradients
        ]
        return clipped, norms

    def noisy_gradient(self, clipped: list[tf.Tensor], weight: tf.Tensor) -> list:
        """``(sum_i w_i * clipped_i + N(0, (sigma C)^2 I)) / B`` per variable,
        through the privacy plan (which records the step)."""
        summed = []
        for g in clipped:
            w = tf.reshape(tf.cast(weight, g.dtype), [-1] + [1] * (len(g.shape) - 1))
            summed.append(tf.reduce_sum(g * w, axis=0))
        return self._privatize(summed)

    def _privatize(self, summed: list[tf.Tensor]) -> list:
        variables = self.model.trainable_variables
        plan = self.privacy_plan
        return plan.privatize(
            summed,
            variables,
            plan.joint_noise_group(variables, self.l2_norm_clip),
            self.optimizer,
        )

    @property
    def l2_norm_clip(self) -> float:
        """C, the bound on each example's gradient norm; checked when set
        (after construction too)."""
        return self._l2_norm_clip

    @l2_norm_clip.setter
    def l2_norm_clip(self, value: float) -> None:
        clip = real_or_nan(value)
        if not (clip >= MIN_L2_NORM_CLIP and math.isfinite(clip)):
            raise ValueError(
                f"`l2_norm_clip` must be a finite number >= {MIN_L2_NORM_CLIP} "
                "(below it, float32 squares flushed to zero make gradient norms "
                f"too small to clip). Received: l2_norm_clip={value!r}"
            )
        self._l2_norm_clip = clip

    def compile(self, *args, **kwargs):
        """As `keras.Model.compile`, then the checks a DP model needs."""
        super().compile(*args, **self._distributed_compile_options(kwargs))
        self.privacy_plan.check_ready("DPSGDModel")
        self._check_strategy()
        self._check_clipping()  # the loss, now known

    def train_step(self, data):
        self._check_strategy()
        self._check_clipping()  # where the loss is read: it may be a new one
        self._check_replica_entry()
        _check_network(self.model, probe=False)  # sublayers made since (lazily)
        self._claim_network()
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        refuse_nested_batch(x=x, y=y, sample_weight=sample_weight)
        x, y, weight = sanitize_batch(
            x,
            y,
            sample_weight,
            run_asserts=not self.jit_compile,
            guards=[
                self.privacy_plan.batch_size_guard(
                    tf.convert_to_tensor(x), sample_weight
                ),
                *self._entry_guards(),
            ],
        )
        if self.clipping_method == "ghost":
            step = clipped_gradient_sum(
                self.model,
                x,
                y,
                self._per_example_losses,
                weight,
                self.l2_norm_clip,
                margin=BOUND_MARGIN,
            )
            y_pred, losses = step.predictions, step.losses
            noisy = self._privatize(step.gradients)
        else:
            gradients, y_pred, losses = self.per_example_gradients(x, y)
            clipped, _ = self.clip_per_example(gradients)
            noisy = self.noisy_gradient(clipped, weight)
        self.optimizer.apply(noisy, self.model.trainable_variables)
        weight = tf.cast(weight, losses.dtype)
        groups = self.privacy_plan.joint_noise_group(
            self.model.trainable_variables, self.l2_norm_clip
        )
        return self._train_logs(
            tf.reduce_sum(losses * weight), x, y, y_pred, weight, groups
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "model": keras.saving.serialize_keras_object(self.model),
                **self._dp_config(),
                "l2_norm_clip": self.l2_norm_clip,
                "clipping": self.clipping,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config, dp = cls._split_dp_config(config)
        config, (model,) = pop_keras_objects(config, ("model",), custom_objects)
        return cls(
            model,
            DPParameters.from_dict(dp["dp_parameters"]),
            DatasetMetadata.from_dict(dp["dataset_metadata"]),
            report_train_metrics=dp["report_train_metrics"],
            **config,
        )


def tanh_cnn(input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """The standard DP-SGD CNN (Papernot et al. 2021; Tramer & Boneh 2021):
    two tanh convolutions with max pooling, a tanh dense layer (~26k
    parameters on 28x28)."""
    small = input_shape[0] < 16
    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Conv2D(
                16,
                3 if small else 8,
                strides=1 if small else 2,
                padding="same",
                activation="tanh",
            ),
            keras.layers.MaxPooling2D(2, 1),
            keras.layers.Conv2D(
                32,
                3 if small else 4,
                strides=1 if small else 2,
                padding="valid",
                activation="tanh",
            ),
            keras.layers.MaxPooling2D(2, 1),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="tanh"),
            keras.layers.Dense(num_classes),
        ]
    )

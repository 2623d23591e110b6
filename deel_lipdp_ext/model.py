"""DP model wrappers: `DPSequential`, `DPModel`, and their clipless DP train step.

The train step (DESIGN §3 rules 1-3):
  1. per-sample losses (times a 0/1 sample weight) summed and divided by the
     EXPECTED batch size B, so no batch, short or Poisson, gives a sample
     more than L / B weight;
  2. gradients of the variables the forward pass used, bounded by
     `compute_gradient_bounds` (keyed by `variable.path`);
  3. Gaussian noise added once per step: global `sigma * sqrt(sum_l b_l^2)`
     or per-layer `sigma * b_l * nm_coef_l`;
  4. optimizer step, then the layers' projections (post-processing);
  5. a step counter (a model variable, saved with it) for the accountant.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import keras
import tensorflow as tf
from keras.src.models.functional import Functional, functional_from_config
from keras.src.ops.function import make_node_key
from keras.src.trainers.data_adapters import data_adapter_utils

from .accounting import PrivacySpec, Release, merge_releases
from .bounds import check_dp_chain, compute_gradient_bounds, noise_coefficients
from .data import DatasetMetadata
from .layers.bounded import DP_BoundedInput
from .losses import lipschitz_constant

NOISIFY_STRATEGIES = ("global", "per-layer")
_PACKAGE = "deel_lipdp_ext"


@dataclass(frozen=True)
class DPParameters:
    """Noise and privacy target of a DP model.

    Args:
        noise_multiplier: sigma; noise std = sigma * sensitivity.
        delta: the delta of the (epsilon, delta) report.
        noisify_strategy: "global" (one sensitivity for all variables) or
            "per-layer" (each variable its own, scaled by its layer's nm_coef).
        seed: seed of the noise generator (None: random).
    """

    noise_multiplier: float
    delta: float
    noisify_strategy: str = "global"
    seed: int | None = None

    def __post_init__(self):
        sigma = self.noise_multiplier
        if (
            isinstance(sigma, bool)
            or not isinstance(sigma, int | float)
            or not (sigma > 0 and math.isfinite(sigma))
        ):
            raise ValueError(
                "`noise_multiplier` must be a positive finite number. "
                f"Received: noise_multiplier={sigma!r}"
            )
        if not isinstance(self.delta, int | float) or not 0 < self.delta < 1:
            raise ValueError(
                f"`delta` must be in (0, 1). Received: delta={self.delta!r}"
            )
        if self.noisify_strategy not in NOISIFY_STRATEGIES:
            raise ValueError(
                "`noisify_strategy` must be 'global' or 'per-layer'. "
                f"Received: {self.noisify_strategy!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DPParameters:
        return cls(**d)


def _finite_rows(t: tf.Tensor) -> tf.Tensor:
    """(batch,) bool: every value of the row is finite (always True for integers)."""
    if not t.dtype.is_floating:
        return tf.ones(tf.shape(t)[:1], tf.bool)
    return tf.reduce_all(tf.math.is_finite(tf.reshape(t, (tf.shape(t)[0], -1))), axis=1)


def sanitize_batch(x, y, sample_weight, *, run_asserts: bool = True, extra_checks=()):
    """The batch a DP train step may use, and the per-sample weights in [0, 1].

    Raises (through `tf.debugging` asserts, when `run_asserts`) on NaN/Inf in an
    input or label, or on a weight outside [0, 1] (a larger weight would exceed
    the per-sample bound); since XLA drops asserts, such samples are also zeroed
    (weight 0) so they can never reach the gradient. `extra_checks` are further
    assert ops everything downstream must depend on.
    """
    x, y = tf.convert_to_tensor(x), tf.convert_to_tensor(y)
    finite = _finite_rows(x) & _finite_rows(y)
    dtype = x.dtype if x.dtype.is_floating else tf.float32
    weight = (
        tf.ones(tf.shape(x)[:1], dtype)
        if sample_weight is None
        else tf.reshape(tf.cast(sample_weight, dtype), (-1,))
    )
    checks = list(extra_checks)
    if run_asserts:
        checks.append(
            tf.debugging.Assert(
                tf.reduce_all(finite),
                ["DP train step: an input or label contains NaN or Inf."],
            )
        )
        checks.append(
            tf.debugging.Assert(
                tf.reduce_all((weight >= 0.0) & (weight <= 1.0)),
                [
                    "DP train step: sample weights must lie in [0, 1] (a larger "
                    "weight would exceed the per-sample bound)."
                ],
            )
        )
    # Everything downstream (forward, gradients, update) depends on the checks.
    with tf.control_dependencies(checks):
        x, y, weight = tf.identity(x), tf.identity(y), tf.identity(weight)
    keep = tf.reshape(finite, [-1] + [1] * (len(x.shape) - 1))
    x = tf.where(keep, x, tf.zeros_like(x))
    keep_y = tf.reshape(finite, [-1] + [1] * (len(y.shape) - 1))
    y = tf.where(keep_y, y, tf.zeros_like(y))
    weight = tf.clip_by_value(weight, 0.0, 1.0) * tf.cast(finite, dtype)
    return x, y, weight


class _DPTrainer:
    """The clipless DP train step and privacy bookkeeping, mixed into a Keras model."""

    def _init_dp(self, dp_parameters, dataset_metadata) -> None:
        if isinstance(dp_parameters, dict):
            dp_parameters = DPParameters.from_dict(dp_parameters)
        if isinstance(dataset_metadata, dict):
            dataset_metadata = DatasetMetadata.from_dict(dataset_metadata)
        for name, value, cls in (
            ("dp_parameters", dp_parameters, DPParameters),
            ("dataset_metadata", dataset_metadata, DatasetMetadata),
        ):
            if value is not None and not isinstance(value, cls):
                raise TypeError(
                    f"`{name}` must be a {cls.__name__}. "
                    f"Received: {type(value).__name__}"
                )
        self.dp_parameters = dp_parameters
        self.dataset_metadata = dataset_metadata
        # Private releases besides the gradient steps (dynamic clipping), saved
        # with the model; and the callbacks that plan more (not saved).
        self.privacy_ledger: tuple[Release, ...] = ()
        self.release_schedules: list = []
        self._dp_loss = None
        self.dp_steps = keras.Variable(
            0, dtype="int64", trainable=False, name="dp_steps"
        )
        seed = dp_parameters.seed if dp_parameters is not None else None
        self._noise_seed = keras.random.SeedGenerator(seed, name="dp_noise_seed")

    # ----------------------------------------------------------------- checks
    @property
    def dp_layers(self) -> list:
        raise NotImplementedError

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, **kwargs):
        """As `keras.Model.compile`; the loss must be a DP loss (with `get_L`)."""
        lipschitz_constant(loss)  # raises TypeError naming a loss without get_L
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)
        self._dp_loss = loss
        self._check_dp_ready()

    def compile_from_config(self, config):
        """Re-compile on `load_model` (our `compile` only adds checks)."""
        from keras.src.saving import serialization_lib

        self.compile(**serialization_lib.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def _check_dp_ready(self) -> None:
        """Refuse (DESIGN §3 rule 6) anything that would train unbounded."""
        if self.dp_parameters is None or self.dataset_metadata is None:
            raise ValueError(
                f"{type(self).__name__} needs `dp_parameters` (DPParameters) and "
                "`dataset_metadata` (DatasetMetadata). Received: "
                f"dp_parameters={self.dp_parameters!r}, "
                f"dataset_metadata={self.dataset_metadata!r}"
            )
        check_dp_chain(self.dp_layers)
        if tf.distribute.has_strategy() and (
            tf.distribute.get_strategy().num_replicas_in_sync > 1
        ):
            raise NotImplementedError(
                "DP training under a multi-replica tf.distribute strategy is not "
                "supported yet: per-replica noise would not match the accounting."
            )
        first = self.dp_layers[0]
        if not first.enforce_clipping and self.compiled and self.jit_compile:
            raise ValueError(
                f"DP_BoundedInput '{first.name}' has enforce_clipping=False, whose "
                "input-norm check cannot run under XLA (jit_compile=True). Use "
                "enforce_clipping=True or compile with jit_compile=False."
            )
        for layer in self.dp_layers:
            layer.set_expected_batch_size(self.dataset_metadata.batch_size)
        if self.built:
            bounded = noise_coefficients(self.dp_layers)
            for variable in self.trainable_variables:
                if variable.path not in bounded:
                    raise ValueError(
                        f"Trainable variable '{variable.path}' has no gradient bound: "
                        "no DP layer of the chain owns it."
                    )

    # ----------------------------------------------------------------- bounds
    def _num_outputs(self) -> int:
        return int(self.outputs[0].shape[-1])

    def compute_gradient_bounds(
        self, num_outputs: int | None = None
    ) -> dict[str, tf.Tensor]:
        """Per-sample gradient bound of each trainable variable, keyed by path."""
        if self._dp_loss is None:
            raise ValueError(
                "Compile the model with a DP loss before computing bounds."
            )
        num_outputs = num_outputs or self._num_outputs()
        return compute_gradient_bounds(
            self.dp_layers,
            lipschitz_constant(self._dp_loss, num_outputs),
            self.dataset_metadata.batch_size,
        )

    # ------------------------------------------------------------- train step
    def _sanitize_batch(self, x, y, sample_weight):
        """`sanitize_batch`, plus the input-bound check of the first layer."""
        bound_checks = []
        first = self.dp_layers[0]
        if not self.jit_compile and not first.enforce_clipping:
            bound_checks.append(first.check_bound(x))
        return sanitize_batch(
            x,
            y,
            sample_weight,
            run_asserts=not self.jit_compile,
            extra_checks=bound_checks,
        )

    def _noise_stddevs(self, variables, bounds) -> list:
        """Noise std per variable from the bounds (global or per-layer strategy)."""
        sigma = float(self.dp_parameters.noise_multiplier)
        if self.dp_parameters.noisify_strategy == "global":
            sensitivity = tf.sqrt(
                tf.add_n([tf.square(bounds[v.path]) for v in variables])
            )
            return [sigma * sensitivity for _ in variables]
        coefs = noise_coefficients(self.dp_layers)
        return [sigma * coefs[v.path] * bounds[v.path] for v in variables]

    def _add_noise(self, gradients, variables, bounds):
        """Add the Gaussian noise: ONE draw per step, split across variables, so
        the noise of different variables is independent by construction (two
        variables sharing a seed would let their difference cancel the noise)."""
        for g, v in zip(gradients, variables, strict=True):
            if g is None:
                raise ValueError(f"Trainable variable '{v.path}' received no gradient.")
        sizes = [int(v.shape.num_elements()) for v in variables]
        standard = keras.random.normal((sum(sizes),), seed=self._noise_seed)
        pieces = tf.split(standard, sizes)
        stddevs = self._noise_stddevs(variables, bounds)
        return [
            g + tf.cast(tf.reshape(z, tf.shape(g)) * std, g.dtype)
            for g, z, std in zip(gradients, pieces, stddevs, strict=True)
        ]

    def _project(self) -> None:
        for layer in self.dp_layers:
            variable = layer.bounded_variable if layer.has_parameters() else None
            if variable is not None and variable.trainable:
                layer.project()

    def scaled_per_sample_losses(self, y, y_pred, weight=None) -> tf.Tensor:
        """`w_i * loss_i / B` for each sample, shape (batch,): the quantity whose
        sum the train step differentiates (and the sensitivity tools audit).

        B is the EXPECTED batch size (DESIGN §3 rule 1), and the loss must give
        exactly one value per sample, from (batch, outputs) logits.

        Raises:
            ValueError: logits not (batch, outputs), or not one loss per sample.
        """
        if y_pred.shape.rank != 2:
            raise ValueError(
                "A DP model's output must have shape (batch, outputs): a loss "
                "summed over more axes would exceed the per-sample bound. "
                f"Received output shape: {y_pred.shape}"
            )
        per_sample = self._dp_loss.call(y, y_pred)
        if per_sample.shape.rank != 1:
            raise ValueError(
                f"Loss {self._dp_loss.name!r} must return one value per sample, "
                f"shape (batch,), for the per-sample bound to hold. Received: "
                f"{per_sample.shape}"
            )
        if weight is not None:
            per_sample = per_sample * tf.cast(weight, per_sample.dtype)
        return per_sample / float(self.dataset_metadata.batch_size)

    def train_step(self, data):
        self._check_dp_ready()
        x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
        x, y, weight = self._sanitize_batch(x, y, sample_weight)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = tf.reduce_sum(self.scaled_per_sample_losses(y, y_pred, weight))
        variables = self.trainable_variables
        gradients = tape.gradient(loss, variables)
        bounds = self.compute_gradient_bounds(int(y_pred.shape[-1]))
        noisy = self._add_noise(gradients, variables, bounds)
        self.optimizer.apply(noisy, variables)
        self._project()
        self.dp_steps.assign_add(1)
        self._loss_tracker.update_state(loss)
        return self.compute_metrics(x, y, y_pred, sample_weight=weight)

    # -------------------------------------------------------------- privacy
    def record_release(self, release: Release) -> None:
        """Add a private release (e.g. a clipping update) to the ledger that
        `privacy_spec` reports: nothing that reads the data is left out."""
        if not isinstance(release, Release):
            raise TypeError(f"Expected a Release. Received: {release!r}")
        self.privacy_ledger = merge_releases((*self.privacy_ledger, release))

    def privacy_spec(
        self, steps: int | None = None, releases: tuple[Release, ...] | None = None
    ) -> PrivacySpec:
        """The mechanism run so far: `steps` gradient steps (default: the steps
        taken) and `releases` (default: the ledger), for the accountant."""
        sigma = float(self.dp_parameters.noise_multiplier)
        if self.dp_parameters.noisify_strategy == "global":
            multipliers = (sigma,)
        else:
            coefs = noise_coefficients(self.dp_layers)
            multipliers = tuple(sigma * coefs[v.path] for v in self.trainable_variables)
        meta = self.dataset_metadata
        return PrivacySpec(
            sampling_rate=meta.sampling_rate,
            steps=int(self.dp_steps.numpy()) if steps is None else int(steps),
            noise_multipliers=multipliers,
            delta=float(self.dp_parameters.delta),
            sampling=meta.sampling,
            releases=self.privacy_ledger if releases is None else tuple(releases),
        )

    def _restore_dp_config(
        self, dp_parameters: dict | None, metadata: dict | None, ledger: list
    ):
        """Set the DP configuration read back by `from_config`."""
        self.privacy_ledger = merge_releases([Release(**r) for r in ledger or ()])
        if dp_parameters is not None:
            self.dp_parameters = DPParameters.from_dict(dp_parameters)
        if metadata is not None:
            self.dataset_metadata = DatasetMetadata.from_dict(metadata)

    def _dp_config(self) -> dict:
        return {
            "dp_parameters": None
            if self.dp_parameters is None
            else self.dp_parameters.to_dict(),
            "dataset_metadata": (
                None
                if self.dataset_metadata is None
                else self.dataset_metadata.to_dict()
            ),
            "privacy_ledger": [r.to_dict() for r in self.privacy_ledger],
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DPSequential(_DPTrainer, keras.Sequential):
    """A `keras.Sequential` of DP layers trained with clipless DP-SGD.

    Args:
        layers: DP layers, starting with `DP_BoundedInput` (an `keras.Input`
            or `DP_InputLayer` may come first).
        dp_parameters: `DPParameters` (noise multiplier, delta, strategy, seed).
        dataset_metadata: `DatasetMetadata` of the training data (expected
            batch size, number of samples, sampling).
        name: model name.

    Raises (at compile or first step, before any update):
        TypeError: a non-DP layer, or a loss without `get_L`.
        ValueError: no leading `DP_BoundedInput`, a variable without bound, ...

    Example:
        >>> model = DPSequential([...], dp_parameters=DPParameters(1.2, 1e-5),
        ...                      dataset_metadata=meta)
    """

    def __init__(
        self, layers=None, dp_parameters=None, dataset_metadata=None, **kwargs
    ):
        keras.Sequential.__init__(self, layers=layers, **kwargs)
        self._init_dp(dp_parameters, dataset_metadata)

    @property
    def dp_layers(self) -> list:
        return self.layers

    def get_config(self):
        return {**keras.Sequential.get_config(self), **self._dp_config()}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        dp_parameters = config.pop("dp_parameters", None)
        metadata = config.pop("dataset_metadata", None)
        ledger = config.pop("privacy_ledger", [])
        model = super().from_config(config, custom_objects=custom_objects)
        model._restore_dp_config(dp_parameters, metadata, ledger)
        return model


def _functional_chain(model: keras.Model) -> list:
    """The model's layers if its graph is a single chain input -> ... -> output.

    Raises:
        ValueError: naming the layer where the graph branches or reuses a layer.
    """
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(
            "DPModel needs exactly one input and one output. Received: "
            f"{len(model.inputs)} inputs, {len(model.outputs)} outputs"
        )
    previous = model.inputs[0]._keras_history.operation
    chain = []
    for op in model.operations:
        if isinstance(op, keras.layers.InputLayer):
            continue
        nodes = [
            n
            for i, n in enumerate(op._inbound_nodes)  # noqa: SLF001
            if make_node_key(op, i) in model._nodes  # noqa: SLF001
        ]
        if len(nodes) != 1:
            raise ValueError(
                f"Layer '{op.name}' is called {len(nodes)} times in the DPModel graph: "
                "DP models must be a chain that calls each layer once."
            )
        parents = {
            id(t._keras_history.operation) for t in nodes[0].arguments.keras_tensors
        }
        if parents != {id(previous)}:
            raise ValueError(
                f"Layer '{op.name}' does not take its input from the layer before it "
                f"('{previous.name}'): DPModel graphs must be a single chain (use "
                "DP_SplitResidual/DP_WrappedResidual/DP_MergeResidual for residuals)."
            )
        chain.append(op)
        previous = op
    if model.outputs[0]._keras_history.operation is not previous:
        raise ValueError("The DPModel output is not the output of the last layer.")
    return chain


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DPModel(_DPTrainer, Functional):
    """A functional Keras model of DP layers trained with clipless DP-SGD.

    The graph must be a single chain (residual blocks go through the
    DP residual layers, which carry the two branches as a pair); it is
    verified, so the bound pass follows exactly what the model computes.

    Args:
        inputs, outputs: as for a functional `keras.Model`.
        dp_parameters: `DPParameters`.
        dataset_metadata: `DatasetMetadata`.
        dp_layers: optional, the layers in call order; if given it must match
            the graph's chain (deel-lipdp compatibility).
    """

    def __init__(self, inputs, outputs, name=None, **kwargs):
        # Keras serialises a Functional subclass only if its constructor has
        # Functional's signature, so the DP arguments travel in **kwargs.
        dp_parameters = kwargs.pop("dp_parameters", None)
        dataset_metadata = kwargs.pop("dataset_metadata", None)
        dp_layers = kwargs.pop("dp_layers", None)
        Functional.__init__(self, inputs=inputs, outputs=outputs, name=name, **kwargs)
        self._chain = _functional_chain(self)
        if dp_layers is not None and [id(x) for x in dp_layers] != [
            id(x) for x in self._chain
        ]:
            raise ValueError(
                "`dp_layers` does not match the layers of the graph, in call order. "
                f"Received: {[x.name for x in dp_layers]}; graph: "
                f"{[x.name for x in self._chain]}"
            )
        self._init_dp(dp_parameters, dataset_metadata)

    @property
    def dp_layers(self) -> list:
        return self._chain

    def get_config(self):
        return {**Functional.get_config(self), **self._dp_config()}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        dp_parameters = config.pop("dp_parameters", None)
        metadata = config.pop("dataset_metadata", None)
        ledger = config.pop("privacy_ledger", [])
        model = functional_from_config(cls, config, custom_objects=custom_objects)
        model._restore_dp_config(dp_parameters, metadata, ledger)
        return model


DP_Sequential = DPSequential
DP_Model = DPModel

__all__ = [
    "DPParameters",
    "DPSequential",
    "DPModel",
    "DP_Sequential",
    "DP_Model",
    "NOISIFY_STRATEGIES",
    "DP_BoundedInput",
]

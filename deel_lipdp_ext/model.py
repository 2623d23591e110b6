"""DP model wrappers: `DPSequential`, `DPModel`, and their clipless DP train step.

The train step (docs/design.md, "The rules that make the guarantee true"):
  1. the batch is sanitised (finite after the cast to float32, equal leading
     dimensions, sample weights in [0, 1], at most as many samples as the
     declared sampling can produce);
  2. per-sample losses (times the sample weights) are SUMMED, and their
     gradient taken: one sample's share is its own gradient;
  3. each variable's per-sample bound comes from `compute_gradient_bounds`
     (keyed by `variable.path`), starting from the loss's Lipschitz constant;
  4. the privacy plan adds Gaussian noise (global or per-layer groups), divides
     by the expected batch size B and records the step in its ledger;
  5. optimizer step, then the layers' projections (post-processing).

`PrivateModel` is the part shared with `DPSGDModel`: the privacy plan, the
checks of `fit`'s data against the declared sampling, the DP configuration
saved with the model.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf
from keras.src.backend.common import global_state
from keras.src.models.functional import Functional, functional_from_config
from keras.src.ops.function import make_node_key
from keras.src.trainers.data_adapters import array_slicing, data_adapter_utils
from keras.src.utils import python_utils

from ._keras_utils import turn_off_tensor_float_32
from .augmentation import check_augmentation, mean_over_copies, repeat_and_augment
from .bounds import (
    MAX_ACTIVATION_BOUND,
    check_dp_chain,
    compute_gradient_bounds,
    gradient_bounds_and_peak,
    noise_coefficients,
    residual_pair_problems,
    walk_layers,
)
from .data import (
    DatasetMetadata,
    pad_to_buckets,
    sampling_provenance,
    shuffled_batches,
)
from .distribution import (
    check_strategy,
    distribute_and_mark,
    mark_splitting,
    num_replicas,
    num_workers,
    reducible_logs,
    splits_batches,
)
from .layers.bounded import DP_BoundedInput
from .layers.clipping import DP_ClipGradient
from .losses import lipschitz_constant
from .privacy_plan import (
    NOISIFY_STRATEGIES,
    DPParameters,
    Guard,
    HasPrivacyPlan,
    PrivacyPlan,
    require_gradients,
    variable_storage,
)

_PACKAGE = "deel_lipdp_ext"
_DP_CONFIG_KEYS = ("dp_parameters", "dataset_metadata")


class _Untracked:
    """A plain holder, invisible to Keras's and TensorFlow's tracking."""

    def __init__(self, value):
        self.value = value


def _finite_rows(t: tf.Tensor) -> tf.Tensor:
    """(batch,) bool: every value of the row is finite (always True for integers)."""
    if not t.dtype.is_floating:
        return tf.ones(tf.shape(t)[:1], tf.bool)
    return tf.reduce_all(tf.math.is_finite(tf.reshape(t, (tf.shape(t)[0], -1))), axis=1)


def _batch_spec(spec: tf.TensorSpec) -> tf.TensorSpec:
    """`spec` with an unknown batch dimension (a replica's batch varies)."""
    if spec.shape.rank is None or spec.shape.rank == 0:
        return spec
    return tf.TensorSpec([None, *spec.shape[1:]], spec.dtype)


def _as_float32(t) -> tf.Tensor:
    """Floating tensors in the float32 compute dtype (a finite float64 above the
    float32 maximum becomes inf here, where the finiteness check sees it)."""
    t = tf.convert_to_tensor(t)
    return tf.cast(t, tf.float32) if t.dtype.is_floating else t


def refuse_nested_batch(**parts) -> None:
    """Raise if an input, label or weight is a structure (dict, list, tuple) of
    tensors: the checks and bounds here hold for one tensor each."""
    for name, value in parts.items():
        if tf.nest.is_nested(value):
            raise ValueError(
                f"DP train step: {name} is a {type(value).__name__} of tensors. DP "
                "models take one input tensor, one label tensor and one weight "
                "tensor per batch (networks with several inputs or outputs are "
                "not supported)."
            )


def sanitize_batch(
    x, y, sample_weight, *, run_asserts: bool = True, guards: Sequence = ()
):
    """The batch a DP train step may use, and the per-sample weights in [0, 1].

    Inputs and labels are cast to float32 first, then checked. Raises (through
    `tf.debugging` asserts, when `run_asserts`) on NaN/Inf in an input or
    label, on a non-finite weight or one outside [0, 1] (a larger weight would
    exceed the per-sample bound), and on leading dimensions of x, y and the
    weights that differ (they would broadcast: one sample counted many times).
    Unequal static dimensions raise a ValueError at once. Since XLA drops
    asserts, every refusal also zeroes: offending samples get weight 0, and a
    batch whose dimensions differ, or that fails one of the `guards`, gets all
    weights 0 (a noise-only step: nothing of the data reaches the update).

    Args:
        guards: `Guard`s (assert message, boolean scalar tensor) of further
            conditions the whole batch must meet.
    """
    refuse_nested_batch(x=x, y=y, sample_weight=sample_weight)
    x, y = _as_float32(x), _as_float32(y)
    weight = (
        tf.ones(tf.shape(x)[:1], tf.float32)
        if sample_weight is None
        else tf.reshape(tf.cast(sample_weight, tf.float32), (-1,))
    )
    static = {"x": x.shape[0], "y": y.shape[0], "sample_weight": weight.shape[0]}
    if sample_weight is None:
        del static["sample_weight"]
    if len({v for v in static.values() if v is not None}) > 1:
        raise ValueError(
            "x, y and sample_weight must have the same leading (batch) dimension: "
            f"they would broadcast. Received: {static}"
        )
    n = tf.shape(x)[0]
    same_length = (tf.shape(y)[0] == n) & (tf.shape(weight)[0] == n)
    finite_x, finite_y = _finite_rows(x), _finite_rows(y)
    guards = [
        Guard(
            "x, y and sample_weight have different leading dimensions (they "
            "would broadcast)",
            same_length,
        ),
        *guards,
    ]
    checks = []
    if run_asserts:
        checks = [
            tf.debugging.Assert(g.holds, [f"DP train step: {g.message}"])
            for g in guards
        ]
        checks.append(
            tf.debugging.Assert(
                tf.reduce_all(finite_x) & tf.reduce_all(finite_y),
                ["DP train step: an input or label contains NaN or Inf."],
            )
        )
        checks.append(
            tf.debugging.Assert(
                tf.reduce_all((weight >= 0.0) & (weight <= 1.0)),
                [
                    "DP train step: sample weights must be finite and lie in [0, 1] "
                    "(a larger weight would exceed the per-sample bound)."
                ],
            )
        )
    # Everything downstream (forward, gradients, update) depends on the checks.
    with tf.control_dependencies(checks):
        x, y, weight = tf.identity(x), tf.identity(y), tf.identity(weight)
    # Each mask has its own tensor's length: nothing here broadcasts x or y.
    x = tf.where(
        tf.reshape(finite_x, [-1] + [1] * (len(x.shape) - 1)), x, tf.zeros_like(x)
    )
    y = tf.where(
        tf.reshape(finite_y, [-1] + [1] * (len(y.shape) - 1)), y, tf.zeros_like(y)
    )
    weight = tf.where(tf.math.is_finite(weight), weight, tf.zeros_like(weight))
    batch_ok = tf.cast(tf.reduce_all(tf.stack([g.holds for g in guards])), tf.float32)
    weight = (
        tf.clip_by_value(weight, 0.0, 1.0)
        * tf.cast(finite_x, tf.float32)
        * tf.cast(finite_y, tf.float32)
        * batch_ok
    )
    return x, y, weight


def check_float32_compute(layers, owner: str) -> None:
    """Refuse layers that compute or store variables in another dtype than
    float32 (mixed precision): the bounds are proved for float32 arithmetic.

    Raises:
        ValueError: naming every such layer and its dtype policy.
    """
    bad = [
        f"'{layer.name}' ({layer.dtype_policy.name})"
        for layer in layers
        if isinstance(layer, keras.layers.Layer)
        and (
            layer.dtype_policy.compute_dtype != "float32"
            or layer.dtype_policy.variable_dtype != "float32"
        )
    ]
    if bad:
        raise ValueError(
            f"{owner} trains in float32 only: the sensitivity bounds and the noise "
            "are proved for float32 arithmetic (a bfloat16/float16 gradient can "
            "exceed its bound by rounding). Use the 'float32' dtype policy. "
            f"Received: {', '.join(bad)}"
        )


def refuse_regularizers(layers, owner: str) -> None:
    """Refuse weight and activity regularizers: a DP model differentiates
    the per-example losses only, so their loss would be left out silently
    (and an activity regularizer's is computed from the data, outside every
    bound).

    Raises:
        ValueError: naming every such layer (use the optimizer's
            `weight_decay` for weight decay).
    """
    found = {}
    for layer in layers:
        if getattr(layer, "activity_regularizer", None) is not None:
            found[f"{layer.name}.activity_regularizer"] = None
        for v in getattr(layer, "weights", ()):
            if getattr(v, "regularizer", None) is not None:
                found[f"{v.path} regularizer"] = None
    if found:
        raise ValueError(
            f"{owner} does not support regularizers: their loss is not part of the "
            "per-example losses it differentiates. For weight decay, use the "
            "optimizer's `weight_decay`. Received: " + ", ".join(found)
        )


def _check_fit_callbacks(callbacks: list) -> None:
    """Refuse a callback of `fit` (flat: `_flat_callbacks`) whose output would
    report less than ran.

    Raises:
        ValueError: a `ModelCheckpoint(save_best_only=True)`.
    """
    for callback in callbacks:
        if isinstance(callback, keras.callbacks.ModelCheckpoint) and getattr(
            callback, "save_best_only", False
        ):
            raise ValueError(
                "ModelCheckpoint(save_best_only=True) is not supported by a DP "
                "model: the file it keeps was chosen by the epochs after it, but "
                "reports the epsilon of the epoch it was written at. Use "
                "EarlyStopping(restore_best_weights=True) and save after fit (the "
                "saved model reports every step that ran), or save_best_only=False."
            )


def _flat_callbacks(callbacks) -> list:
    """`fit`'s callbacks as one flat list, as Keras reads them (any nest of
    lists, tuples and dicts, CallbackLists unwrapped); an iterator is read
    once (checked, then passed on as this list)."""
    if callbacks is None:
        return []
    if isinstance(callbacks, keras.callbacks.CallbackList):
        callbacks = callbacks.callbacks
    elif isinstance(callbacks, Iterator):
        callbacks = list(callbacks)
    flat = []
    for callback in keras.tree.flatten(callbacks):
        if isinstance(callback, keras.callbacks.CallbackList):
            flat += _flat_callbacks(callback)
        else:
            flat.append(callback)
    return flat


def _backups_first(callbacks: list) -> list:
    """`callbacks` (flat) with BackupAndRestore first, so that the state it
    restores at the start of training is what every other callback's
    `on_train_begin` reads (a DP_Accountant before it checked the budget
    against the state before the restore: epsilon 10.3 for a budget of 9.1)."""
    backups = [c for c in callbacks if isinstance(c, keras.callbacks.BackupAndRestore)]
    return backups + [c for c in callbacks if c not in backups]


def _callbacks_for_fit(given, flat: list, model: keras.Model):
    """What `fit` passes to Keras: a CallbackList as given (its history and
    progress-bar settings kept) when its BackupAndRestore callbacks already
    come first, bound to `model` (Keras binds only the lists it builds: a
    list made for another model had a DP_Accountant report that model's
    epsilon and check its budget, a review), else the flat list with them
    first.

    Raises:
        ValueError: a CallbackList whose BackupAndRestore is not first.
    """
    ordered = _backups_first(flat)
    if not isinstance(given, keras.callbacks.CallbackList):
        return ordered
    if ordered != flat:
        raise ValueError(
            "Put BackupAndRestore first in the CallbackList given to a DP model's "
            "fit: the state it restores must be what the other callbacks (a "
            "DP_Accountant's budget check) read when training starts."
        )
    given.set_model(model)
    return given


def _refuse_legacy_hdf5(filepath, method: str) -> None:
    """Refuse a legacy HDF5 path (`.h5` / `.hdf5`, not `.weights.h5`) given to
    a DP model's `save` or `load_weights`. Keras's legacy writer saves the
    layers' weights, then fails on the privacy ledger (a table), and its
    reader skips the missing ledger: a model loaded from such a file held
    trained weights and reported epsilon 0 (a review).

    Raises:
        ValueError: a legacy HDF5 path.
    """
    path = str(filepath)
    if path.endswith((".h5", ".hdf5")) and not path.endswith(".weights.h5"):
        raise ValueError(
            f"A DP model's {method} does not take the legacy HDF5 format "
            f"({path!r}): it cannot hold the privacy ledger (the steps that "
            "ran), so a model loaded from it would report less than ran. Use "
            "a '.keras' file, or '.weights.h5' for the weights. Weights trained "
            "elsewhere (public data) can be loaded into a plain Keras model and "
            "copied with set_weights."
        )


def _refuse_legacy_hdf5_config(what: str) -> None:
    """Refuse a DP model's config inside Keras's legacy HDF5 writer or reader
    (`keras.saving.save_model` / `load_model` of a `.h5` path, which bypass
    the model's own `save`): the writer reads the config before any weight,
    so nothing trained is written; the reader would load trained weights
    and no ledger (epsilon 0 for 12 steps that ran, a review).

    Raises:
        ValueError: inside the legacy HDF5 format.
    """
    if global_state.get_global_attribute("use_legacy_config", False):
        raise ValueError(
            f"A DP model cannot {what} in the legacy HDF5 format: it cannot hold "
            "the privacy ledger (the steps that ran). Use a '.keras' file."
        )


def _same_rows(a, b) -> bool:
    """Whether two inputs hold the same samples (one array, a view of it, or a
    copy); anything but arrays of one shape is not compared."""
    try:
        a, b = np.asarray(a), np.asarray(b)
    except (TypeError, ValueError):
        return False
    if a.shape != b.shape or a.dtype == object or a.size == 0:
        return False
    return bool(np.shares_memory(a, b) or np.array_equal(a, b))


def _check_validation_data(validation_data, x) -> None:
    """Refuse the training data as `validation_data`: its metrics would be
    computed from private data without noise, outside the epsilon.

    Raises:
        ValueError: a dataset built (or declared) as training batches
            (`data.sampling_provenance`), or the training arrays (the same,
            a view or an equal copy). A guard against mistakes, not a
            boundary: `evaluate` on the training data is the user's own
            noiseless release.
    """
    if validation_data is None:
        return
    parts = validation_data if isinstance(validation_data, tuple | list) else ()
    first = parts[0] if parts else validation_data
    same = x is not None and not isinstance(x, tf.data.Dataset) and _same_rows(first, x)
    if sampling_provenance(validation_data) is not None or same:
        raise ValueError(
            "validation_data is the training data: its loss and metrics would be "
            "computed from the private samples without noise, which the epsilon "
            "does not cover. Pass held-out data (e.g. the test dataset of "
            "data.from_numpy)."
        )


class _FitStepMarker(keras.callbacks.Callback):
    """fit's last callback: marks that the next call of the train function
    is fit's own (Keras calls it right after `on_train_batch_begin`), so only
    that call's steps carry the sampling fit checked; a train function called
    from a callback with an iterator of its own ran as 'poisson' (a review)."""

    def __init__(self, owner: keras.Model):
        super().__init__()
        self._owner = owner  # the model (Keras sets `model` only in fit)
        self._list = None

    def on_train_batch_begin(self, batch, logs=None):
        self._owner._dp_fit_calls_next.value = True  # noqa: SLF001

    def on_train_batch_end(self, batch, logs=None):
        self._owner._dp_fit_calls_next.value = False  # noqa: SLF001

    def added_to(self, callbacks):
        """`callbacks` (a list or a CallbackList) with this marker last."""
        if isinstance(callbacks, keras.callbacks.CallbackList):
            callbacks.callbacks.append(self)
            self._list = callbacks
            return callbacks
        return [*callbacks, self]

    def remove(self) -> None:
        """Out of a given CallbackList again (it may serve another fit)."""
        self._owner._dp_fit_calls_next.value = False  # noqa: SLF001
        if self._list is not None and self in self._list.callbacks:
            self._list.callbacks.remove(self)


def _secretly_shuffled(a: dict, batch_size: int, nb_samples: int) -> dict:
    """fit's arguments with its training arrays (checked: shuffled sampling,
    B, N rows) as `data.shuffled_batches`, a fresh permutation each epoch
    from operating-system entropy. Keras shuffles arrays from the global seed:
    after `keras.utils.set_random_seed` every epoch and every run had the
    same, known batches (a review). `validation_split` splits off the last
    rows first, as Keras does when `validation_data` is None."""
    arrays = (a["x"], a["y"], a["sample_weight"])
    validation = a["validation_data"]
    if validation is None and a["validation_split"]:
        arrays, held_out = array_slicing.train_validation_split(
            arrays, validation_split=a["validation_split"]
        )
        validation = tuple(t for t in held_out if t is not None)
    x, y, sample_weight = arrays
    given = (
        {"y": y} if sample_weight is None else {"y": y, "sample_weight": sample_weight}
    )
    for name, value in given.items():
        if not (
            isinstance(value, np.ndarray | tf.Tensor) or hasattr(value, "__array__")
        ):
            raise ValueError(
                f"A DP model's fit() on arrays takes {name} as one array (the "
                f"labels of one output). Received: {type(value).__name__}"
            )
        if len(value) != len(x):
            raise ValueError(
                f"fit()'s x and {name} differ in length: {len(x)} vs {len(value)}"
            )
    if len(x) != nb_samples:  # checked before; this is what trains
        raise ValueError(
            f"fit() would train on {len(x)} rows but the metadata's N is "
            f"{nb_samples}: the epsilon would be false."
        )
    return {
        "x": shuffled_batches(x, y, batch_size, sample_weight=sample_weight),
        "y": None,
        "sample_weight": None,
        "batch_size": None,
        "validation_split": 0.0,
        "validation_data": validation,
    }


def _claim_one(plan, item, what: str, variables: list) -> None:
    """Claim `item` (a layer, a variable or its storage) for `plan`, unless
    another live plan holds it, or a gone one whose steps may have trained
    `variables` (`PrivateModel._claim`)."""
    owner, record = getattr(item, "_dp_claim", (None, None))
    owner = owner() if owner is not None else None
    if owner is plan:
        return
    if owner is not None or (record is not None and record.trained(variables)):
        gone = "" if owner is not None else ", now gone,"
        raise ValueError(
            f"{what} belongs to another DP model{gone} whose privacy plan "
            "accounts the steps that trained it. Build the new model from fresh "
            "layers and load the weights (save_weights/load_weights carry the "
            "ledger)."
        )
    # untracked: neither Keras nor tf.train.Checkpoint may save it
    object.__setattr__(item, "_dp_claim", (weakref.ref(plan), plan.record))


class PrivateModel(HasPrivacyPlan):
    """What every DP model shares: its privacy plan, the check of `fit`'s data
    against the declared sampling, and the DP configuration it saves."""

    def _init_privacy(
        self,
        dp_parameters,
        dataset_metadata,
        noise_coefficients=None,
        report_train_metrics: bool = False,
    ):
        if not isinstance(report_train_metrics, bool):
            raise ValueError(
                "`report_train_metrics` must be a bool. "
                f"Received: report_train_metrics={report_train_metrics!r}"
            )
        self.report_train_metrics = report_train_metrics
        self._dp_entry = _Untracked(None)  # see _entry_guards
        self._dp_fitting = _Untracked(False)  # a fit runs (`fit`)
        self._dp_pinned = _Untracked([])  # its accountants (`pin_to_fit`)
        self._dp_in_train_function = _Untracked(False)  # (`make_train_function`)
        self._dp_fit_calls_next = _Untracked(False)  # (`_FitStepMarker`)
        self._dp_traced_steps = _Untracked(1)  # steps per execution, as traced
        self._privacy_plan = PrivacyPlan(
            dp_parameters, dataset_metadata, noise_coefficients
        )
        # A change of sigma or metadata discards the traced step (which holds
        # them as constants): the next step is traced with the new values.
        self._privacy_plan.on_change = self._forget_train_function
        # The state variables are the model's attributes, so every save and
        # checkpoint path (save, save_weights, tf.train.Checkpoint) holds them.
        for name, variable in self._privacy_plan.state_variables.items():
            setattr(self, name, variable)

    def _claim(self, layers) -> None:
        """A layer, and each variable it holds, belongs to one DP model: the
        ledger of the steps that trained the weights lives in that model's
        plan, so another DP model built from the same layer objects, or from
        a layer holding the same variables, would report an epsilon that
        forgets them (reviews: a network trained 40 steps by one DPSGDModel,
        wrapped by a second, reported epsilon 3.79 after 8 more steps for
        7.11; so did a layer holding the trained kernel, 3.79 for 5.41). The
        claim outlives its model: what a collected model's plan stepped stays
        refused. Trained weights move between models by save/load or
        get/set_weights of the DP model, with the ledger; weights copied out
        of a bare layer or network (its get_weights, copy, deepcopy, pickle)
        carry no ledger, and a model built on them reports only its own
        steps (docs/design.md, rule 6).

        Raises:
            ValueError: a layer or variable claimed by another live DP model,
                or by one that is gone but whose steps may have trained it.
        """
        plan = self._privacy_plan
        for layer in layers:
            weights = list(layer.weights)
            plan.record.note_claimed(weights)
            for variable in weights:
                what = f"Variable '{variable.path}' (of layer '{layer.name}')"
                _claim_one(plan, variable, what, [variable])
                storage = variable_storage(variable)
                if storage is not variable:  # another wrapper may hold it
                    _claim_one(plan, storage, what, [variable])
            _claim_one(plan, layer, f"Layer '{layer.name}'", weights)

    def compile_from_config(self, config):
        """Re-compile on `load_model` (our `compile` only adds checks)."""
        from keras.src.saving import serialization_lib

        self.compile(**serialization_lib.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    # The saved ledger is what ran, rollbacks included, wherever the state
    # variables leave the model or older ones come in: a model exported after
    # set_weights or restore_best_weights must not report less (a review
    # found tf.train.Checkpoint and get_weights carrying the rolled-back rows).
    # Reading `model.variables` directly after an in-place checkpoint restore
    # still sees the restored rows (no hook): export through these methods.
    def save(self, filepath, *args, **kwargs):
        """As `keras.Model.save`; the legacy HDF5 format is refused (below)."""
        _refuse_legacy_hdf5(filepath, "save")
        return super().save(filepath, *args, **kwargs)

    def load_weights(self, filepath, *args, **kwargs):
        """As `keras.Model.load_weights`; legacy HDF5 files are refused
        (below)."""
        _refuse_legacy_hdf5(filepath, "load_weights")
        return super().load_weights(filepath, *args, **kwargs)

    def save_own_variables(self, store):
        self._privacy_plan.persist_ledger()
        super().save_own_variables(store)

    def load_own_variables(self, store):
        super().load_own_variables(store)
        self._privacy_plan.persist_ledger()

    def get_weights(self):
        self._privacy_plan.persist_ledger()
        return super().get_weights()

    def set_weights(self, weights):
        super().set_weights(weights)
        self._privacy_plan.persist_ledger()

    def get_state_tree(self, *args, **kwargs):
        self._privacy_plan.persist_ledger()
        return super().get_state_tree(*args, **kwargs)

    def set_state_tree(self, *args, **kwargs):
        super().set_state_tree(*args, **kwargs)
        self._privacy_plan.persist_ledger()

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        # tf.train.Checkpoint / SavedModel list the variables to write here
        if tf.executing_eagerly():
            self._privacy_plan.persist_ledger()
        return super()._trackable_children(save_type, **kwargs)

    @property
    def dp_parameters(self) -> DPParameters | None:
        return self._privacy_plan.dp_parameters

    @property
    def dataset_metadata(self) -> DatasetMetadata | None:
        return self._privacy_plan.dataset_metadata

    @property
    def dp_steps(self) -> keras.Variable:
        """Noisy steps taken (a saved variable)."""
        return self._privacy_plan.steps

    def set_noise_multiplier(self, noise_multiplier: float) -> None:
        """Use a new noise multiplier (e.g. from
        `privacy_plan.calibrate_noise_multiplier`) for the steps to come; the
        train function is traced again and the ledger keeps the old steps'."""
        self._privacy_plan.set_noise_multiplier(noise_multiplier)

    def compile(self, *args, **kwargs):
        """As `keras.Model.compile`; `loss_weights` is refused: the DP step
        reads its loss per sample, unweighted (a weight was silently ignored;
        applied, it would scale the gradient past its bound)."""
        given = inspect.signature(keras.Model.compile).bind(self, *args, **kwargs)
        weights = given.arguments.get("loss_weights")
        if weights is not None:
            raise ValueError(
                f"{type(self).__name__} does not support `loss_weights` (its "
                "per-sample loss gradients are bounded or clipped unweighted). "
                f"Scale the loss itself instead. Received: loss_weights={weights!r}"
            )
        super().compile(*args, **kwargs)

    def _step_settings(self) -> object:
        """What the traced train step reads from the layers as constants
        (none here; see DPTrainer): the train function is traced again when
        it changes."""
        return None

    def _forget_train_function(self) -> None:
        # A running fit calls self.train_function at its next step (e.g. after
        # a callback's set_noise_multiplier): a fresh one, traced with the new
        # values at its first call, not None.
        traced = getattr(self, "train_function", None) is not None
        self.train_function = None
        if traced:
            self.make_train_function()

    def _check_strategy(self) -> None:
        """Refuse an unsupported strategy, and a model used under another
        strategy than the one it was created under.

        Raises:
            NotImplementedError: an unsupported strategy.
            ValueError: the model created outside the strategy in scope, or
                under another one.
        """
        owner = type(self).__name__
        check_strategy(owner, self.distribute_strategy)
        own = getattr(self, "_distribute_strategy", None)
        if tf.distribute.has_strategy() and tf.distribute.get_strategy() is not own:
            raise ValueError(
                f"This {owner} was created outside the "
                f"{type(tf.distribute.get_strategy()).__name__} in scope (or under "
                "another one): its variables are not that strategy's. Create, "
                "compile and train the model under one strategy.scope()."
            )
        if self.distribute_strategy.num_replicas_in_sync > 1:
            plain = [
                v.path
                for v in self.trainable_variables
                if not isinstance(v.value, tf.distribute.DistributedValues)
            ]
            if plain:
                raise ValueError(
                    f"{owner}: variables created outside the strategy's scope are "
                    f"not mirrored on its replicas: {plain[:3]}. Create every layer "
                    "(and a wrapped model) under strategy.scope()."
                )
            if self._jit_compile is True:
                raise ValueError(
                    f"{owner}: jit_compile=True does not run under a multi-replica "
                    f"{type(self.distribute_strategy).__name__} (Keras compiles one "
                    "XLA program across the replicas' devices). Use "
                    "jit_compile=False."
                )
            optimizer = getattr(self, "optimizer", None)
            unsupported = [
                option
                for option, value in (
                    (
                        "gradient_accumulation_steps",
                        getattr(optimizer, "gradient_accumulation_steps", None),
                    ),
                    (
                        "use_ema with ema_overwrite_frequency",
                        getattr(optimizer, "use_ema", False)
                        and getattr(optimizer, "ema_overwrite_frequency", None),
                    ),
                )
                if value
            ]
            if unsupported:
                raise ValueError(
                    f"{owner}: the optimizer's {unsupported[0]} does not run under "
                    "a multi-replica strategy (Keras's cross-replica merge fails, "
                    "also for plain Keras models). Train without it."
                )

    def _check_replica_entry(self) -> None:
        """Under several replicas, a train step is traced only for this
        model's train function (`make_train_function`, which `fit` and
        `train_on_batch` call); a step traced for it and run otherwise is
        refused in the graph (`_entry_guards`).

        Raises:
            ValueError: a step traced outside it, e.g. a custom
                `strategy.run(model.train_step, args=(batch,))`, which can give
                every replica the whole batch.
        """
        if self._dp_fitting.value and not self._dp_in_train_function.value:
            raise RuntimeError(
                f"{type(self).__name__}.train_step was called directly while fit "
                "runs (from a callback): its steps would pass the budget check, "
                "which runs in the train function, and not the data fit checked. "
                "Use train_on_batch, or train after fit returns."
            )
        replicas = max(num_replicas(), self.distribute_strategy.num_replicas_in_sync)
        if replicas > 1 and self._dp_entry.value is None:
            raise ValueError(
                f"Under a multi-replica strategy, {type(self).__name__} trains "
                "inside fit or train_on_batch only: a custom strategy.run(train_step) "
                "or train_function call can give every replica the whole batch, "
                "and each sample would count once per replica."
            )

    @contextlib.contextmanager
    def _splits_batches(self):
        """While `fit` / `train_on_batch` run, the datasets Keras distributes
        (`strategy.experimental_distribute_dataset`, which splits each global
        batch over the replicas) are `mark_splitting`'s: the train function
        takes their iterators (`_check_iterator`)."""
        strategy = self.distribute_strategy
        check_strategy(type(self).__name__, strategy)  # no method replaced
        patch = "experimental_distribute_dataset" not in vars(strategy)  # else ours
        if patch:
            strategy.experimental_distribute_dataset = distribute_and_mark(strategy)
        try:
            yield
        finally:
            if patch:
                del strategy.experimental_distribute_dataset

    def _entry_variable(self) -> tf.Variable:
        """A mirrored bool, True only while this model's train function runs
        (set around each call under several replicas)."""
        if self._dp_entry.value is None:
            with self.distribute_strategy.scope():
                self._dp_entry.value = tf.Variable(
                    False, trainable=False, name="dp_train_function_running"
                )
        return self._dp_entry.value

    def _entry_guards(self) -> list:
        """Under several replicas, the train step's guard that it runs inside
        this model's train function: a `strategy.run(model.train_step)` of
        one's own, traced inside `fit` (where the trace-time check passes)
        and run there or later, can give every replica the whole batch."""
        if self.distribute_strategy.num_replicas_in_sync == 1:
            return []
        self._check_replica_entry()  # the variable exists
        return [
            Guard(
                "under a multi-replica strategy the train step runs only inside "
                "the model's train function (fit, train_on_batch): a "
                "strategy.run(train_step) of one's own can give every replica "
                "the whole batch",
                self._dp_entry.value.read_value(),
            )
        ]

    def _check_iterator(self, iterator) -> None:
        """Under several replicas the train function takes only iterators of
        datasets that split each global batch over the replicas
        (`distribution.mark_splitting`: Keras's own in `fit`, the checked
        dataset given to `fit`, `train_on_batch`'s).

        Raises:
            ValueError: another iterator (a plain one: every replica would
                get the whole batch; `distribute_datasets_from_function`'s:
                every replica may get its own whole batch).
        """
        if self.distribute_strategy.num_replicas_in_sync == 1:
            return
        if not splits_batches(iterator):
            raise ValueError(
                f"Under a multi-replica strategy, {type(self).__name__}'s train "
                "function runs on the batches of fit or train_on_batch only: this "
                f"iterator ({type(iterator).__name__}) was not made by them, and "
                "it can give every replica a whole batch (each sample would count "
                "once per replica)."
            )

    def _distributed_compile_options(self, kwargs: dict) -> dict:
        """`compile`'s keyword arguments under a multi-replica strategy: Keras
        compiles ONE XLA program over every replica's devices, which
        TensorFlow refuses (its variables live on other devices), so
        `jit_compile="auto"` becomes False (True is refused by
        `_check_strategy`, which also sees it set after compile)."""
        replicas = self.distribute_strategy.num_replicas_in_sync
        if replicas == 1 or kwargs.get("jit_compile", "auto") is True:
            return kwargs
        return {**kwargs, "jit_compile": False}

    def make_train_function(self, force=False):
        """Keras's train function, which under several replicas takes only
        iterators of split batches (`_check_iterator`) and flags that it runs
        (`_entry_guards`). TensorFloat-32 is turned off first
        (`turn_off_tensor_float_32`)."""
        turn_off_tensor_float_32(type(self).__name__)
        function = super().make_train_function(force) or self.train_function
        if getattr(function, "_dp_replica_guard", False):
            return function

        if self.distribute_strategy.num_replicas_in_sync > 1:
            entry = self._entry_variable()  # made before the step is traced
        else:
            entry = None

        self._dp_traced_steps.value = max(int(self.steps_per_execution), 1)
        traced = []  # the step's settings (`_step_settings`) at its first call

        def train_function(iterator):
            settings = self._step_settings()
            if traced and settings != traced[0]:
                # changed since the trace (a layer's nm_coef): traced again, so
                # the budget check below plans with what runs (a review: the
                # old trace ran on while the check planned with the new value,
                # and a budget of 3 was overrun to 3.14)
                self._forget_train_function()
                return self.train_function(iterator)
            traced[:] = [settings]
            self._check_iterator(iterator)
            for check in list(self._privacy_plan.step_checks):
                check(())  # after every callback: a budget check sees all changes
            # fit's own call (marked by its last callback) runs on the data fit
            # checked; any other (a callback's, train_on_batch) is unverified
            fits, self._dp_fit_calls_next.value = self._dp_fit_calls_next.value, False
            self._dp_in_train_function.value = True
            try:
                with self._privacy_plan.steps_of_checked_sampling(fits):
                    if entry is None:
                        return function(iterator)
                    entry.assign(True)  # read by the step's guard (_entry_guards)
                    try:
                        return function(iterator)
                    finally:
                        entry.assign(False)
            finally:
                self._dp_in_train_function.value = False

        train_function._dp_replica_guard = True
        self.train_function = train_function
        return train_function

    def steps_per_call(self) -> int:
        """The most steps one call of the train function runs: its steps per
        execution as traced, or as set since (a budget check plans for it)."""
        return max(self._dp_traced_steps.value, int(self.steps_per_execution), 1)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Under a strategy, Keras builds from the element-wise MEAN of the
        # replicas' first batches, which fails when they differ in size (a
        # Poisson batch split over replicas, a partial last batch), and
        # reading a batch would use up a Poisson epoch's draws. One replica's
        # element spec has every shape and dtype the build needs.
        if iterator is not None and getattr(self, "_distribute_strategy", None):
            spec = iterator.data_adapter.get_tf_dataset().element_spec
            data_batch = keras.tree.map_structure(
                lambda s: _batch_spec(
                    s._value_specs[0] if hasattr(s, "_value_specs") else s
                ),
                spec,
            )
        super()._maybe_symbolic_build(data_batch=data_batch)

    def fit(self, *args, **kwargs):
        """As `keras.Model.fit`, after checking that the data can come from the
        sampling `dataset_metadata` declares (see `PrivacyPlan.check_training_data`);
        the sampling that runs is recorded with every step. Under
        `jit_compile=True`, unpadded Poisson batches are padded to a few
        bucket sizes (`data.pad_to_buckets`) so XLA compiles a few shapes."""
        if self._dp_fitting.value:
            raise RuntimeError(
                "fit was called while this model's fit runs (from a callback): "
                "the inner fit would reset what the outer one checks (its "
                "sampling, its epoch count and its budget checks). Train after "
                "fit returns."
            )
        bound = inspect.signature(keras.Model.fit).bind(self, *args, **kwargs)
        bound.apply_defaults()
        plan = self._privacy_plan
        plan.check_ready(type(self).__name__)
        checks = list(plan.step_checks)  # registered outside this fit: kept
        marker = _FitStepMarker(self)
        try:  # a refusal below leaves later steps "unverified", as after fit
            call = self._checked_fit_arguments(bound.arguments)
            call["callbacks"] = marker.added_to(call["callbacks"])
            self._dp_fitting.value = True
            with self._splits_batches():
                return super().fit(**call)
        finally:
            marker.remove()
            for accountant in self._dp_pinned.value:
                accountant.release_fit(self)
            self._dp_pinned.value = []
            self._dp_fitting.value = False
            plan.use_unverified_sampling()
            plan.step_checks[:] = checks

    def _checked_fit_arguments(self, a: dict) -> dict:
        """Keras fit's arguments once `a` (fit's bound arguments) passed the
        checks: the sampling (recorded), the callbacks, the validation data;
        arrays shuffled secretly, unpadded Poisson batches bucketed for XLA."""
        plan = self._privacy_plan
        splits = a["validation_data"] is None  # as Keras: else the split is ignored
        plan.check_training_data(
            a["x"],
            batch_size=a["batch_size"],
            shuffle=a["shuffle"],
            validation_split=a["validation_split"] if splits else 0.0,
            strategy=self.distribute_strategy,
        )
        callbacks = _flat_callbacks(a["callbacks"])
        _check_fit_callbacks(callbacks)
        for callback in callbacks:  # a DP_Accountant reports on this model
            if hasattr(callback, "pin_to_fit"):
                callback.pin_to_fit(self)
                self._dp_pinned.value.append(callback)
        _check_validation_data(a["validation_data"], a["x"])
        plan.start_fit(a["initial_epoch"])
        call = {name: value for name, value in a.items() if name != "self"}
        call["callbacks"] = _callbacks_for_fit(a["callbacks"], callbacks, self)
        data = a["x"]
        if not isinstance(data, tf.data.Dataset | tf.distribute.DistributedDataset):
            call.update(
                _secretly_shuffled(
                    a, plan.expected_batch_size, plan.dataset_metadata.nb_samples_train
                )
            )
        call["shuffle"] = False  # datasets sample themselves (Keras warns on True)
        provenance = sampling_provenance(data)
        if (
            self.jit_compile
            and provenance is not None
            and provenance.sampling == "poisson"
            and provenance.padding == "none"
            and not provenance.declared
        ):  # XLA compiles once per batch shape: a few buckets, not every size
            call["x"] = pad_to_buckets(data)
        if isinstance(data, tf.distribute.DistributedDataset):
            mark_splitting(data)  # checked above: its batches are split
        return call

    def train_on_batch(
        self, x, y=None, sample_weight=None, class_weight=None, return_dict=False
    ):
        """As `keras.Model.train_on_batch`; its steps are recorded with the
        sampling 'unverified' (the caller vouches for the batches). Under
        several replicas (one worker) the batch is split over them, each
        sample to one replica."""
        # never fit's own call, even when fit's next one is marked (a callback
        # after the marker): unverified, and fit's own call keeps its mark
        marked, self._dp_fit_calls_next.value = self._dp_fit_calls_next.value, False
        try:
            return self._unverified_train_on_batch(
                x, y, sample_weight, class_weight, return_dict
            )
        finally:
            self._dp_fit_calls_next.value = marked

    def _unverified_train_on_batch(
        self, x, y, sample_weight, class_weight, return_dict
    ):
        strategy = self.distribute_strategy
        if strategy.num_replicas_in_sync == 1:
            return super().train_on_batch(
                x, y, sample_weight, class_weight, return_dict=return_dict
            )
        if num_workers(strategy) > 1:
            raise ValueError(
                "train_on_batch is not supported under several workers (each "
                "would pass its own batch): use fit on "
                "distribution.distributed_poisson_batches."
            )
        if class_weight is not None:
            raise ValueError(
                "class_weight is not supported by a DP model's train_on_batch "
                "under a multi-replica strategy: pass sample_weight in [0, 1]."
            )
        batch = (x, y) if sample_weight is None else (x, y, sample_weight)
        self._maybe_symbolic_build(data_batch=(x, y, sample_weight))
        self.make_train_function()
        self.reset_metrics()
        with self._splits_batches():  # the split below is marked
            split = strategy.experimental_distribute_dataset(
                tf.data.Dataset.from_tensors(batch)
            )
            logs = python_utils.pythonify_logs(self.train_function(iter(split)))
        return logs if return_dict else self._flatten_metrics_in_order(logs)

    def _train_logs(self, loss, x, y, y_pred, weight, groups) -> dict:
        """The train step's logs: `sensitivity`, the L2 sensitivity of the
        step's noisy sum (from the weights: public), and, only if the model was
        built with `report_train_metrics=True`, the loss and metrics of the
        training batch. Those are computed from private data WITHOUT noise (the
        epsilon does not cover them), so they are withheld by default;
        validation metrics are unaffected."""
        logs = {
            "sensitivity": tf.sqrt(
                tf.add_n(
                    [tf.square(tf.cast(g.sensitivity, tf.float32)) for g in groups]
                )
            )
        }
        if self.report_train_metrics:
            self._loss_tracker.update_state(
                loss / tf.maximum(tf.reduce_sum(weight), 1.0)
            )
            logs.update(self.compute_metrics(x, y, y_pred, sample_weight=weight))
        return reducible_logs(logs)

    def test_step(self, data):
        return reducible_logs(super().test_step(data))

    def get_metrics_result(self):
        """As Keras's, skipping the compiled metrics a step never built (the
        train step withholds them unless `report_train_metrics`)."""
        results = {}
        for metric in self.metrics:
            if not getattr(metric, "built", True):
                continue
            result = metric.result()
            if isinstance(result, dict):
                results.update(result)
            else:
                results[metric.name] = result
        return python_utils.pythonify_logs(results)

    def _dp_config(self) -> dict:
        _refuse_legacy_hdf5_config("save")
        plan = self._privacy_plan
        return {
            "report_train_metrics": self.report_train_metrics,
            "dp_parameters": None
            if plan.dp_parameters is None
            else plan.dp_parameters.to_dict(),
            "dataset_metadata": None
            if plan.dataset_metadata is None
            else plan.dataset_metadata.to_dict(),
        }

    @staticmethod
    def _split_dp_config(config: dict) -> tuple[dict, dict]:
        """(the Keras part of a saved config, the DP keyword arguments)."""
        _refuse_legacy_hdf5_config("load")
        config = dict(config)
        config.pop("privacy_ledger", None)  # older files: the ledger is a weight now
        dp = {k: config.pop(k, None) for k in _DP_CONFIG_KEYS}
        dp["report_train_metrics"] = bool(config.pop("report_train_metrics", False))
        for key in ("augmentation", "augmentation_multiplicity"):
            if key in config:
                dp[key] = config.pop(key)
        return config, dp


class DPTrainer(PrivateModel):
    """The clipless DP train step, mixed into a Keras model."""

    def _init_dp(
        self,
        dp_parameters,
        dataset_metadata,
        report_train_metrics=False,
        augmentation=None,
        augmentation_multiplicity: int = 1,
    ) -> None:
        self._dp_loss = None
        self._init_privacy(
            dp_parameters,
            dataset_metadata,
            report_train_metrics=report_train_metrics,
            noise_coefficients=lambda: [
                self._coefficients()[v.path] for v in self.trainable_variables
            ],
        )
        self._set_augmentation(augmentation, augmentation_multiplicity)

    def _set_augmentation(self, augmentation, multiplicity: int) -> None:
        """Check and keep the per-sample augmentation (`augmentation` module)."""
        if isinstance(augmentation, dict):
            augmentation = keras.saving.deserialize_keras_object(augmentation)
        if augmentation is not None or multiplicity != 1:
            meta = self._privacy_plan.dataset_metadata
            if meta is None:
                raise ValueError(
                    "Augmentation needs `dataset_metadata` (its input shape)."
                )
            check_augmentation(augmentation, multiplicity, meta.input_shape)
        # Held untracked: as an attribute, a Keras layer would join the
        # model's layers (and a Sequential's chain).
        self._augmentation = _Untracked(augmentation)
        self.augmentation_multiplicity = multiplicity

    def _dp_config(self) -> dict:
        augmentation = self.augmentation
        return {
            **super()._dp_config(),
            "augmentation": None
            if augmentation is None
            else keras.saving.serialize_keras_object(augmentation),
            "augmentation_multiplicity": self.augmentation_multiplicity,
        }

    def _restore_dp(self, dp: dict) -> None:
        """Set the DP configuration read back by `from_config`."""
        self.report_train_metrics = dp.pop("report_train_metrics")
        augmentation = dp.pop("augmentation", None)
        multiplicity = dp.pop("augmentation_multiplicity", None) or 1
        self.privacy_plan.configure(**dp)
        self._set_augmentation(augmentation, multiplicity)

    # ----------------------------------------------------------------- checks
    @property
    def dp_layers(self) -> list:
        raise NotImplementedError

    @property
    def dp_loss(self):
        """The compiled DP loss (None before `compile`)."""
        return self._dp_loss

    def _step_settings(self) -> object:
        # which layers train and their nm_coef: a layer frozen during fit
        # (no recompile) kept training in the old trace while the budget
        # check planned without its noise (a review)
        # (and which weights: `kernel.trainable = False` alone got past it)
        return (
            tuple(id(v) for v in self.trainable_variables),
            tuple(
                (id(layer), float(layer.nm_coef), layer.trainable)
                for layer, _ in walk_layers(self.dp_layers)
                if layer.has_parameters()
            ),
        )

    def _coefficients(self) -> dict[str, float]:
        return noise_coefficients([layer for layer, _ in walk_layers(self.dp_layers)])

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, **kwargs):
        """As `keras.Model.compile`; the loss must be a DP loss (with `get_L`)."""
        lipschitz_constant(loss)  # raises TypeError naming a loss without get_L
        kwargs = self._distributed_compile_options(kwargs)
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)
        self._dp_loss = loss
        self._check_dp_ready()

    def _check_dp_ready(self) -> None:
        """Refuse (docs/design.md, rule 6) anything that would train unbounded."""
        plan = self._privacy_plan
        if plan.dp_parameters is None or plan.dataset_metadata is None:
            plan.check_ready(type(self).__name__)
        check_dp_chain(self.dp_layers)
        layers = [self, *(layer for layer, _ in walk_layers(self.dp_layers))]
        check_float32_compute(layers, type(self).__name__)
        refuse_regularizers(layers, type(self).__name__)
        self._check_strategy()
        first = self.dp_layers[0]
        if not first.enforce_clipping and self.compiled and self.jit_compile:
            raise ValueError(
                f"DP_BoundedInput '{first.name}' has enforce_clipping=False, whose "
                "input-norm check cannot run under XLA (jit_compile=True). Use "
                "enforce_clipping=True or compile with jit_compile=False."
            )
        inputs = getattr(self, "inputs", None) or []
        built_shape = tuple(inputs[0].shape[1:]) if inputs else None
        if built_shape is not None and built_shape != tuple(
            self.dataset_metadata.input_shape
        ):
            raise ValueError(
                f"{type(self).__name__} takes inputs of shape {built_shape} but "
                "dataset_metadata.input_shape is "
                f"{tuple(self.dataset_metadata.input_shape)}: the bounds are "
                "computed for the built shape, the data checked against the "
                "metadata's. Make them equal."
            )
        self._claim_layers()
        declared = self.dataset_metadata.input_bound
        if (
            not first.enforce_clipping
            and declared is not None
            and declared > first.upper_bound * (1.0 + 1e-6)
        ):
            raise ValueError(
                f"The data's input bound ({declared}, dataset_metadata) exceeds "
                f"DP_BoundedInput '{first.name}'s upper_bound ({first.upper_bound}) "
                "and enforce_clipping=False: every batch would be refused."
            )
        if self.built:
            bounded = self._coefficients()
            for variable in self.trainable_variables:
                if variable.path not in bounded:
                    raise ValueError(
                        f"Trainable variable '{variable.path}' has no gradient bound: "
                        "no DP layer of the chain owns it."
                    )

    def _claim_layers(self) -> None:
        """Claim the DP layers of the chain (`PrivateModel._claim`)."""
        self._claim(layer for layer, _ in walk_layers(self.dp_layers))

    # ----------------------------------------------------------------- bounds
    def _num_outputs(self) -> int:
        return int(self.outputs[0].shape[-1])

    def loss_lipschitz_constant(self, num_outputs: int | None = None) -> float:
        """L: the bound on one sample's loss gradient w.r.t. the logits."""
        if self._dp_loss is None:
            raise ValueError(
                "Compile the model with a DP loss before computing bounds."
            )
        return lipschitz_constant(self._dp_loss, num_outputs or self._num_outputs())

    def compute_gradient_bounds(
        self, num_outputs: int | None = None
    ) -> dict[str, tf.Tensor]:
        """Bound on the norm of one sample's gradient (of its own loss) for each
        trainable variable, keyed by path."""
        return compute_gradient_bounds(
            self.dp_layers, self.loss_lipschitz_constant(num_outputs)
        )

    # ------------------------------------------------------------- train step
    def sanitize_batch(self, x, y, sample_weight, *, train_step: bool = True):
        """`sanitize_batch`, plus the guards the model knows: the batch size the
        declared sampling allows, the input shape the bounds were computed for
        (a bias or a convolution bounds its gradient for its build-time
        size), and the first layer's input bound when it trusts the data.
        With `train_step=False` (a batch read outside the train step, e.g.
        by dynamic clipping, whole in the current context), the train step's
        own guard that it runs inside the train function is left out."""
        refuse_nested_batch(x=x, y=y, sample_weight=sample_weight)
        x = _as_float32(x)
        plan = self._privacy_plan
        guards = [
            plan.batch_size_guard(x, sample_weight),
            plan.input_shape_guard(x),
            *(self._entry_guards() if train_step else []),
        ]
        first = self.dp_layers[0]
        if not first.enforce_clipping:
            guards.append(
                Guard(
                    f"DP_BoundedInput '{first.name}' has enforce_clipping=False but "
                    f"an input sample has L2 norm above upper_bound="
                    f"{first.upper_bound}",
                    first.inputs_within_bound(x),
                )
            )
        return sanitize_batch(
            x, y, sample_weight, run_asserts=not self.jit_compile, guards=guards
        )

    def _refuse_overflow(self, summed: list, peak: tf.Tensor) -> list:
        """The summed gradients, or zeros (a noise-only step, chosen by
        `tf.cond`, not multiplied: 0 * inf is NaN) when an activation bound
        exceeds `MAX_ACTIVATION_BOUND`: squares there could
        overflow float32 for one sample only (an L2 pooling behind a
        DP_Lambda of gain 1e8 made the update NaN with a sample and finite
        without). Outside XLA, an error."""
        safe = peak <= MAX_ACTIVATION_BOUND
        checks = []
        if not self.jit_compile:
            checks.append(
                tf.debugging.Assert(
                    safe,
                    [
                        "DP train step: an activation of the model may exceed the "
                        f"float32-safe norm {MAX_ACTIVATION_BOUND:g} (its squares "
                        "would overflow): lower the input bound, a DP_Lambda's gain "
                        "or a bias's norm_max"
                    ],
                )
            )
        if any(g is None for g in summed):
            return summed  # `privatize` refuses it, naming the variable
        with tf.control_dependencies(checks):
            return tf.cond(
                safe, lambda: summed, lambda: [tf.zeros_like(g) for g in summed]
            )

    def _project(self) -> None:
        for layer in self.dp_layers:
            variable = layer.bounded_variable if layer.has_parameters() else None
            if variable is not None and variable.trainable:
                layer.project()

    def per_sample_losses(self, y, y_pred, weight=None) -> tf.Tensor:
        """`w_i * loss_i` for each sample, shape (batch,): the quantity whose SUM
        the train step differentiates (and the sensitivity tools audit).

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
        return per_sample

    @property
    def augmentation(self):
        """The per-sample augmentation of the train step (None: none)."""
        return self._augmentation.value

    def _prepare_copies(self, k: int) -> None:
        """Augmented copies need the first layer to project each copy onto the
        input ball, and every loss-gradient clip to act per sample, not per
        copy (`DP_ClipGradient.set_copies_per_sample`). Runs at trace time."""
        if self.augmentation is not None and not self.dp_layers[0].enforce_clipping:
            raise ValueError(
                "Augmentation can raise a sample's norm: the first layer must "
                "project onto the input ball (DP_BoundedInput(enforce_clipping=True))."
            )
        for layer, _ in walk_layers(self.dp_layers):
            if isinstance(layer, DP_ClipGradient):
                layer.set_copies_per_sample(k)

    def sample_losses(self, x, y, weight=None) -> tuple[tf.Tensor, tf.Tensor]:
        """`(w_i * loss_i` per sample (batch,), predictions)` of a training
        forward pass: with augmentation multiplicity K, loss_i is the mean of
        sample i's loss over K augmented copies of it (each bounded by the
        first layer, so the per-sample bound holds for the mean), and the
        predictions are those of the copies (batch * K rows)."""
        k = self.augmentation_multiplicity
        if self.augmentation is not None or k > 1:
            self._prepare_copies(k)
        copies = repeat_and_augment(x, self.augmentation, k)
        y_pred = self(copies, training=True)
        labels = tf.repeat(y, k, axis=0) if k > 1 else y
        per_copy = self.per_sample_losses(labels, y_pred)
        per_sample = mean_over_copies(per_copy, k)
        if weight is not None:
            per_sample = per_sample * tf.cast(weight, per_sample.dtype)
        return per_sample, y_pred

    def train_step(self, data):
        self._check_dp_ready()
        self._check_replica_entry()
        plan = self._privacy_plan
        x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
        x, y, weight = self.sanitize_batch(x, y, sample_weight)
        with tf.GradientTape() as tape:
            per_sample, y_pred = self.sample_losses(x, y, weight)
            loss = tf.reduce_sum(per_sample)
        variables = self.trainable_variables

        def backward():
            summed = tape.gradient(loss, variables)
            require_gradients(summed, variables)
            return summed

        # An empty Poisson batch adds noise alone and skips the backward pass
        # (TensorFlow's oneDNN kernels gave a conv network's gradient
        # inconsistent shapes at batch 0). Traced, both branches are built,
        # so every step is refused when a variable gets no gradient; eager,
        # only one would run, so the backward pass always does.
        if tf.executing_eagerly():
            summed = backward()
        else:
            summed = tf.cond(
                tf.shape(per_sample)[0] > 0,
                backward,
                lambda: [tf.zeros_like(v) for v in variables],
            )
        bounds, peak = gradient_bounds_and_peak(
            self.dp_layers, self.loss_lipschitz_constant(int(y_pred.shape[-1]))
        )
        summed = self._refuse_overflow(summed, peak)
        coefficients = self._coefficients()
        groups = plan.noise_groups(
            variables,
            [bounds[v.path] for v in variables],
            [coefficients[v.path] for v in variables],
        )
        noisy = plan.privatize(summed, variables, groups, self.optimizer)
        self.optimizer.apply(noisy, variables)
        self._project()
        if self.augmentation_multiplicity > 1:  # metrics on the first copies
            y_pred = y_pred[:: self.augmentation_multiplicity]
        return self._train_logs(loss, x, y, y_pred, weight, groups)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DPSequential(DPTrainer, keras.Sequential):
    """A `keras.Sequential` of DP layers trained with clipless DP-SGD.

    Args:
        layers: DP layers, starting with `DP_BoundedInput` (an `keras.Input`
            or `DP_InputLayer` may come first).
        dp_parameters: `DPParameters` (noise multiplier, delta, strategy).
        dataset_metadata: `DatasetMetadata` of the training data (expected
            batch size, number of samples, sampling).
        report_train_metrics: put the training batches' loss and metrics in
            the logs. They are computed from the private batches WITHOUT noise,
            so the epsilon does not cover them: off by default (validation
            metrics, on held-out data, are always reported).
        augmentation: a Keras layer (e.g. a Sequential of random preprocessing
            layers) applied to each sample in the train step.
        augmentation_multiplicity: K; each sample's loss is the mean over K
            augmented copies of it (the bound and the noise are unchanged).

    Other keyword arguments (`name`, ...) are those of `keras.Sequential`.

    Raises (at compile or first step, before any update):
        TypeError: a non-DP layer, or a loss without `get_L`.
        ValueError: no leading `DP_BoundedInput`, a variable without bound, ...

    Example:
        >>> from deel_lipdp_ext import layers, losses
        >>> meta = DatasetMetadata((8, 8, 1), num_classes=10,
        ...                        nb_samples_train=1000, nb_samples_test=0,
        ...                        batch_size=50)
        >>> model = DPSequential(
        ...     [keras.Input((8, 8, 1)), layers.DP_BoundedInput(upper_bound=1.0),
        ...      layers.DP_Flatten(), layers.DP_QuickSpectralDense(10)],
        ...     dp_parameters=DPParameters(1.2, 1e-5), dataset_metadata=meta)
        >>> model.compile(keras.optimizers.SGD(0.1),
        ...               losses.DP_TauCategoricalCrossentropy(8.0))
        >>> bounds = model.compute_gradient_bounds()  # {variable path: bound}
        >>> len(bounds), round(float(list(bounds.values())[0]), 4)
        (1, 1.4142)
    """

    def __init__(
        self,
        layers=None,
        dp_parameters=None,
        dataset_metadata=None,
        report_train_metrics: bool = False,
        augmentation: keras.layers.Layer | None = None,
        augmentation_multiplicity: int = 1,
        **kwargs,
    ):
        # before Keras builds them: a layer on a residual pair fails there
        problems = residual_pair_problems(
            [layer for layer in layers or () if isinstance(layer, keras.layers.Layer)]
        )
        if problems:
            raise ValueError("Invalid DP chain: " + "; ".join(problems))
        keras.Sequential.__init__(self, layers=layers, **kwargs)
        self._init_dp(
            dp_parameters,
            dataset_metadata,
            report_train_metrics,
            augmentation,
            augmentation_multiplicity,
        )

    @property
    def dp_layers(self) -> list:
        return self.layers

    def get_config(self):
        return {**keras.Sequential.get_config(self), **self._dp_config()}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config, dp = cls._split_dp_config(config)
        model = super().from_config(config, custom_objects=custom_objects)
        model._restore_dp(dp)
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
    previous_outputs = [model.inputs[0]]
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
        # The layer must take ALL of the previous layer's outputs, each once and
        # in order: a residual pair fed (main, main) would double a branch.
        arguments = nodes[0].arguments.keras_tensors
        if [id(t) for t in arguments] != [id(t) for t in previous_outputs]:
            raise ValueError(
                f"Layer '{op.name}' does not take exactly the outputs of the layer "
                f"before it ('{previous.name}'), once each and in order: DPModel "
                "graphs must be a single chain (use DP_SplitResidual/"
                "DP_WrappedResidual/DP_MergeResidual for residuals)."
            )
        chain.append(op)
        previous = op
        previous_outputs = nodes[0].outputs
    if model.outputs[0]._keras_history.operation is not previous:
        raise ValueError("The DPModel output is not the output of the last layer.")
    return chain


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DPModel(DPTrainer, Functional):
    """A functional Keras model of DP layers trained with clipless DP-SGD.

    The graph must be a single chain (residual blocks go through the
    DP residual layers, which carry the two branches as a pair); it is
    verified, so the bound pass follows exactly what the model computes.

    Args:
        inputs: as for a functional `keras.Model`.
        outputs: as for a functional `keras.Model`.
        name: model name.

    Other Parameters:
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
        report_train_metrics = kwargs.pop("report_train_metrics", False)
        augmentation = kwargs.pop("augmentation", None)
        multiplicity = kwargs.pop("augmentation_multiplicity", 1)
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
        self._init_dp(
            dp_parameters,
            dataset_metadata,
            report_train_metrics,
            augmentation,
            multiplicity,
        )

    @property
    def dp_layers(self) -> list:
        return self._chain

    def get_config(self):
        return {**Functional.get_config(self), **self._dp_config()}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config, dp = cls._split_dp_config(config)
        model = functional_from_config(cls, config, custom_objects=custom_objects)
        model._restore_dp(dp)
        return model


DP_Sequential = DPSequential
DP_Model = DPModel

__all__ = [
    "DPParameters",
    "PrivateModel",
    "DPSequential",
    "DPModel",
    "DP_Sequential",
    "DP_Model",
    "NOISIFY_STRATEGIES",
    "DP_BoundedInput",
]


def __getattr__(name: str):
    # deel-lipdp exports its accountant callback from `lipdp.model`; ours lives
    # in `callbacks`, which imports this module (through `dynamic_clipping`),
    # so it is resolved on first access instead of at import time.
    if name == "DP_Accountant":
        from .callbacks import DP_Accountant

        return DP_Accountant
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

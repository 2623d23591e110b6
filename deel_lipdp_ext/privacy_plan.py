"""The privacy plan: the one object behind the noise a DP model adds and the
epsilon it reports (see docs/design.md, "The privacy plan").

A `PrivacyPlan` is built by every DP model (`DPSequential`, `DPModel`,
`DPSGDModel`) from its `DPParameters` and `DatasetMetadata`. It owns:

* the privacy state, as model variables (so `save`, `save_weights` /
  `load_weights`, `BackupAndRestore` and `tf.train.Checkpoint` restore it):
  the step counter and the LEDGER, one row per distinct mechanism that ran
  (gradient steps at a noise multiplier and sampling rate, or a release such
  as a dynamic-clipping update) with how many times it ran and which sampling
  fed it;
* the noise: `privatize` adds one Gaussian draw per step, split across the
  noise groups, divides the noisy sum by the expected batch size B (the ONE
  place B scales a gradient) and records the step in the ledger, in the same
  traced graph, from the same multipliers;
* the accounting: `ledger()`, `event()`, `epsilon()`, budget planning and
  calibration, all from the ledger (what ran) plus, for planning, the
  mechanism as configured now.

The noise key is secret: drawn from the operating system's entropy (never
Keras's global seed), never written to a config or a weight file. Step k's
noise is drawn statelessly from (key, k, draw index in this process), so a
resumed or rolled-back model never replays a noise value.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import secrets
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import dp_accounting
import keras
import numpy as np
import tensorflow as tf

from ._validation import real_or_nan, require_one_of
from .accounting import (
    GRADIENT_STEPS,
    Release,
    ReleaseSchedule,
    calibrate_noise_multiplier,
    compute_epsilon,
    effective_noise_multiplier,
    epsilon_curve,
    get_max_epochs,
    make_dp_event,
    merge_releases,
)
from .accounting.epsilon import check_accountant
from .data import DatasetMetadata, max_poisson_batch_size, sampling_provenance
from .distribution import (
    is_first_replica,
    max_over_replicas,
    num_workers,
    released_on_every_replica,
    sum_over_replicas,
    sums_replica_gradients,
)
from .layers.base import stable_norm

NOISIFY_STRATEGIES = ("global", "per-layer")
#: The noise std is `sigma * sensitivity * noise_margin()`, with margin
#: `1 + ROUNDING_MARGIN + BATCH_ROUNDING * (largest batch)`: a sensitivity
#: is exact math, but the gradient it bounds is computed in float32. Its
#: norms round (a review measured 1.0000043 C for DP-SGD's clipped sum; the
#: sums that could round more, in large pooling windows and the norms that
#: bound or clip, run in float64 or in float64-added chunks), and the sum
#: over the batch rounds at the batch's scale: removing one example moved
#: it by 1.00067 C at B = 4096 under XLA (2.7 B 2^-24; the allowance is
#: 4 B 2^-24). Measured allowances, not worst-case proofs.
ROUNDING_MARGIN = 1e-4
BATCH_ROUNDING = 2.0**-22


class ReproducibleNoiseWarning(UserWarning):
    """A user-fixed seed makes the noise reproducible: the guarantee then
    assumes the seed is kept secret."""


@dataclass(frozen=True)
class DPParameters:
    """Noise and privacy target of a DP model.

    Args:
        noise_multiplier: sigma; noise std = sigma * sensitivity.
        delta: the delta of the (epsilon, delta) report.
        noisify_strategy: "global" (one sensitivity for all variables) or
            "per-layer" (each variable its own, scaled by its layer's nm_coef).
        seed: None (default): the noise key comes from the operating system's
            entropy. An int fixes the noise stream (reproducible tests): the
            guarantee then assumes the seed is secret. The seed is never saved
            with the model.
    """

    noise_multiplier: float
    delta: float
    noisify_strategy: str = "global"
    seed: int | None = None

    def __post_init__(self):
        # Python floats whatever real number came in (NumPy scalars were
        # refused, a review), checked as stored: a delta of 1 - 1e-30 passed
        # as < 1 and was stored as 1.0 (epsilon 0 reported, a review)
        sigma, delta = real_or_nan(self.noise_multiplier), real_or_nan(self.delta)
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(
                "`noise_multiplier` must be a positive finite number. "
                f"Received: noise_multiplier={self.noise_multiplier!r}"
            )
        if not 0 < delta < 1:
            raise ValueError(
                f"`delta` must be in (0, 1). Received: delta={self.delta!r}"
            )
        object.__setattr__(self, "noise_multiplier", sigma)
        object.__setattr__(self, "delta", delta)
        require_one_of(
            "noisify_strategy",
            self.noisify_strategy,
            NOISIFY_STRATEGIES,
            "DPParameters",
        )
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ValueError(f"`seed` must be None or an int. Received: {self.seed!r}")

    def to_dict(self) -> dict:
        """The saved form: everything but the seed (a saved seed would let
        whoever holds the file regenerate the noise)."""
        d = asdict(self)
        del d["seed"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DPParameters:
        d = dict(d)
        d.pop("seed", None)  # files of older versions: a public seed is no secret
        return cls(**d)


# --------------------------------------------------------------------- sampling
#: How the training data of a step was sampled, as recorded in the ledger.
SAMPLING_LABELS = (
    "poisson",
    "poisson (seeded: reproducible, sampling not secret)",
    "shuffle (accounted as Poisson: heuristic)",
    "declared by the user",
    "unverified (train_on_batch or a custom loop)",
    "not subsampled (no amplification claimed)",
)
POISSON, POISSON_SEEDED, SHUFFLE, DECLARED, UNVERIFIED, NOT_SUBSAMPLED = range(6)

# Ledger columns and mechanism codes.
_MECHANISM, _PARAMETER, _RATE, _COUNT, _SAMPLING = range(5)
_STEPS, _GAUSSIAN, _PURE_DP = 0.0, 1.0, 2.0
_RELEASE_NAMES = {_STEPS: GRADIENT_STEPS, _GAUSSIAN: "gaussian", _PURE_DP: "pure_dp"}
LEDGER_CAPACITY = 64


@dataclass(frozen=True)
class Guard:
    """A condition a whole batch must meet: its assert message, and a boolean
    scalar tensor. Outside XLA a failing guard raises; under XLA the batch's
    weights are zeroed (a noise-only step)."""

    message: str
    holds: tf.Tensor


@dataclass(frozen=True)
class NoiseGroup:
    """Variables that share one Gaussian: each coordinate gets noise of std
    `noise_multiplier * sensitivity`.

    Args:
        variables: the variables (keras.Variable) of the group.
        noise_multiplier: sigma_g (a Python float, fixed when the step is traced).
        sensitivity: scalar float32 tensor, the L2 bound of one sample's
            contribution to the group's summed gradient.
    """

    variables: tuple
    noise_multiplier: float
    sensitivity: tf.Tensor


def step_noise_multiplier(
    sigma: float, coefficients: Sequence[float] | None = None
) -> float:
    """The noise multiplier of ONE step as accounted.

    Global strategy (`coefficients` None): sigma. Per-layer: the groups are
    Gaussians on disjoint coordinates with multipliers sigma * c_l, which
    compose to one Gaussian of multiplier (sum_l (sigma c_l)^-2)^(-1/2).
    """
    if coefficients is None:
        return float(sigma)
    return effective_noise_multiplier([sigma * c for c in coefficients])


def require_gradients(gradients: Sequence, variables: Sequence) -> None:
    """Refuse a step where a trainable variable gets no gradient (None).

    Raises:
        ValueError: naming the first such variable.
    """
    for g, v in zip(gradients, variables, strict=True):
        if g is None:
            raise ValueError(f"Trainable variable '{v.path}' received no gradient.")


def variable_storage(variable):
    """The object holding a variable's values: the `tf.Variable` behind a
    Keras variable (another `keras.Variable` can wrap the same one), else
    `variable` itself."""
    storage = getattr(variable, "value", None)
    return storage if isinstance(storage, tf.Variable) else variable


class TrainingRecord:
    """What the layers and variables a plan claims keep of it (they hold
    this, not the plan): which of them that plan's steps may have trained,
    readable after the plan and its model are gone. A variable a traced step
    updates counts as trained. Once the plan holds steps that did not run in
    this process (restored by load_weights, set_weights or a checkpoint),
    every variable it claimed counts, frozen ones included: the restored
    values may come from training. Variables are known by their storage
    (`variable_storage`).

    Args:
        steps: the plan's step counter.
        saved: (table, size) of its saved ledger.
        shadow: (table, size) of its in-process ledger.
    """

    def __init__(self, steps: tf.Variable, saved: tuple, shadow: tuple):
        self._steps, self._saved, self._shadow = steps, saved, shadow
        self._stepped: dict[int, object] = {}  # id(storage) -> storage
        self._claimed: dict[int, object] = {}

    def note_claimed(self, variables: Sequence) -> None:
        for storage in map(variable_storage, variables):
            self._claimed[id(storage)] = storage

    def note_stepped(self, variables: Sequence) -> None:
        """A traced step updates `variables`."""
        for storage in map(variable_storage, variables):
            self._stepped[id(storage)] = storage

    def restored(self) -> bool:
        """Whether the plan holds steps that did not run in this process
        (read eagerly: claims also run while a train step is traced)."""
        with tf.init_scope():
            here = _step_count(_rows(*self._shadow))
            held = max(_step_count(_rows(*self._saved)), int(self._steps.numpy()))
        return held > here

    def trained(self, variables: Sequence) -> bool:
        """Whether steps of the plan may have trained any of `variables`."""
        ids = {id(variable_storage(v)) for v in variables}
        if ids & self._stepped.keys():
            return True
        return bool(ids & self._claimed.keys()) and self.restored()


class PrivacyPlan:
    """The privacy state and mechanism of one DP model.

    Args:
        dp_parameters: `DPParameters` (or None until the model is configured).
        dataset_metadata: `DatasetMetadata` (or None likewise).
        noise_coefficients: a function returning the per-layer noise
            coefficients (`nm_coef`) of the trainable bounded variables, in
            order; None for a model whose noise is one joint group (DP-SGD).

    Attributes:
        steps, ledger_table, ledger_size, lineage: the state variables; the
            owning model holds them as attributes so they are saved.
        sampling_code: the sampling of the steps running now (not saved):
            'unverified' but while the owner's train function runs in a fit
            whose data was checked (`steps_of_checked_sampling`).
        release_schedules: callbacks that plan releases (not saved).
        step_checks: functions run before each execution of the train
            function and each recorded release, which raise to stop it (not
            saved).
        record: the `TrainingRecord` the layers of the owning model keep.
    """

    def __init__(
        self,
        dp_parameters: DPParameters | None,
        dataset_metadata: DatasetMetadata | None,
        noise_coefficients: Callable[[], list[float]] | None = None,
    ):
        self.on_change: Callable[[], None] | None = None
        self.configure(dp_parameters, dataset_metadata)
        self._noise_coefficients = noise_coefficients
        self.release_schedules: list[ReleaseSchedule] = []
        # Run before each execution of steps (by the owner's train function,
        # after every callback) with (), and before each recorded release
        # with (release,); they raise to stop it. Not saved; `fit` removes
        # those registered in it when it ends.
        self.step_checks: list[Callable[[tuple], None]] = []
        self._checked_sampling = UNVERIFIED  # of the running fit's data
        self._epoch_offset = 0  # model epoch - fit epoch (`start_fit`)
        self.steps = keras.Variable(0, dtype="int64", trainable=False, name="dp_steps")
        self.ledger_table = keras.Variable(
            np.zeros((LEDGER_CAPACITY, 5)),
            dtype="float64",
            trainable=False,
            name="dp_privacy_ledger",
        )
        self.ledger_size = keras.Variable(
            0, dtype="int64", trainable=False, name="dp_privacy_ledger_size"
        )
        # The sampling the next steps run on, set by `fit` for its own data;
        # never saved: a model loaded from a checkpoint written during a
        # Poisson fit must not label its later custom-loop steps Poisson.
        self.sampling_code = tf.Variable(UNVERIFIED, dtype=tf.int64, trainable=False)
        # Never saved: a raw tf.Variable in a plain object is tracked by
        # neither Keras saving nor tf.train.Checkpoint.
        self._draws = tf.Variable(0, dtype=tf.int64, trainable=False)
        # The run's identity, saved: a resumed model continues its run.
        self.lineage = keras.Variable(
            secrets.randbits(62), dtype="int64", trainable=False, name="dp_lineage"
        )
        # A shadow ledger of what ran IN THIS PROCESS, never saved: restoring
        # older state into this model (set_weights, load_weights, a checkpoint:
        # e.g. EarlyStopping(restore_best_weights=True)) rolls the saved ledger
        # back, but not what ran. `ledger()` combines the two.
        self._shadow_table = tf.Variable(
            np.zeros((LEDGER_CAPACITY, 5)), dtype=tf.float64, trainable=False
        )
        self._shadow_size = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.record = TrainingRecord(
            self.steps,
            (self.ledger_table, self.ledger_size),
            (self._shadow_table, self._shadow_size),
        )
        self._shadow_lineage = tf.Variable(0, dtype=tf.int64, trainable=False)
        # The saved state at this process's first record (where the shadow
        # starts): restoring exactly it is restoring the start of this process.
        self._base_table = tf.Variable(
            np.zeros((LEDGER_CAPACITY, 5)), dtype=tf.float64, trainable=False
        )
        self._base_size = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._base_lineage = tf.Variable(-1, dtype=tf.int64, trainable=False)
        # At this process's first record the run takes this lineage, and the
        # shadow starts from the saved rows: only state saved after that point
        # is "the same run" (a restore from before it is summed, safely).
        self._process_lineage = secrets.randbits(62)
        seed = None if self.dp_parameters is None else self.dp_parameters.seed
        self._key = _noise_key(seed)

    # ---------------------------------------------------------------- state
    def configure(
        self,
        dp_parameters: DPParameters | dict | None,
        dataset_metadata: DatasetMetadata | dict | None,
    ) -> None:
        """Set the DP parameters and the metadata (dicts: their saved forms).
        The state variables and the noise key are kept; the owner's traced
        step is discarded (`on_change`), so no step runs with stale values.

        Raises:
            ValueError: a different `dataset_metadata` once steps have run (the
                ledger's rows describe the old data: start a new model).
        """
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
        ran = getattr(self, "steps", None) is not None and int(self.steps.numpy()) > 0
        old = getattr(self, "dataset_metadata", None)
        if ran and dataset_metadata != old:
            raise ValueError(
                "The dataset metadata cannot change once steps have run: the "
                "ledger describes the old sampling. Train a new model on the new "
                f"data. Received: {dataset_metadata!r}, was {old!r}"
            )
        if (
            dp_parameters is not None
            and dataset_metadata is not None
            and dp_parameters.delta * dataset_metadata.nb_samples_train >= 1
        ):
            warnings.warn(
                f"delta={dp_parameters.delta} is >= 1/N (N = "
                f"{dataset_metadata.nb_samples_train}): an (epsilon, delta) "
                "guarantee then allows a mechanism that publishes one training "
                "sample in the clear. Use delta well below 1/N (e.g. 1/N^1.1).",
                stacklevel=3,
            )
        self.dp_parameters = dp_parameters
        self.dataset_metadata = dataset_metadata
        if self.on_change is not None:
            self.on_change()

    @property
    def state_variables(self) -> dict[str, keras.Variable]:
        """The variables the owning model must hold (attribute name: variable)."""
        return {
            "_dp_steps": self.steps,
            "_dp_ledger_table": self.ledger_table,
            "_dp_ledger_size": self.ledger_size,
            "_dp_lineage": self.lineage,
        }

    def check_ready(self, owner: str) -> None:
        """Raise unless the DP parameters and the dataset metadata are set."""
        if self.dp_parameters is None or self.dataset_metadata is None:
            raise ValueError(
                f"{owner} needs `dp_parameters` (DPParameters) and "
                "`dataset_metadata` (DatasetMetadata). Received: "
                f"dp_parameters={self.dp_parameters!r}, "
                f"dataset_metadata={self.dataset_metadata!r}"
            )
        if int(self.ledger_size.numpy()) >= LEDGER_CAPACITY:
            raise ValueError(
                f"The privacy ledger is full ({LEDGER_CAPACITY} distinct "
                "mechanisms): no further step can be recorded, so none may run."
            )

    def set_noise_multiplier(self, noise_multiplier: float) -> None:
        """Use `noise_multiplier` for the steps traced from now on (the steps
        already run keep theirs in the ledger)."""
        seed = self.dp_parameters.seed
        self.configure(
            DPParameters(
                noise_multiplier,
                self.dp_parameters.delta,
                self.dp_parameters.noisify_strategy,
                seed,
            ),
            self.dataset_metadata,
        )

    # ----------------------------------------------------------- train step
    def noise_margin(self) -> float:
        """The factor on every noise std (`ROUNDING_MARGIN`, `BATCH_ROUNDING`)."""
        return 1.0 + ROUNDING_MARGIN + BATCH_ROUNDING * self.max_batch_size()

    @property
    def expected_batch_size(self) -> int:
        """B: the expected number of samples in a batch."""
        return self.dataset_metadata.batch_size

    def max_batch_size(self) -> int:
        """The largest batch the declared sampling can produce: B for shuffled
        batches; for Poisson, `max_poisson_batch_size` (exceeded with probability
        < 1e-20)."""
        meta = self.dataset_metadata
        if meta.sampling == "poisson":
            return max_poisson_batch_size(meta.nb_samples_train, meta.sampling_rate)
        return meta.batch_size

    def batch_size_guard(self, x: tf.Tensor, sample_weight=None) -> Guard:
        """A batch may not have more samples than the declared sampling can
        produce (static sizes are refused at trace time). The samples are
        the rows of weight > 0 when `sample_weight` is given (padding rows of
        weight 0 do not count); under several replicas the limit holds for
        the global batch: the replicas' samples summed."""
        limit = self.max_batch_size()
        size = x.shape[0]
        message = (
            f"A batch of more samples than the declared sampling can produce "
            f"({self.dataset_metadata.sampling}, expected batch size "
            f"{self.expected_batch_size}, at most {limit}): the accountant's "
            "sampling rate would not describe what ran."
        )
        if size is not None and size > limit:
            raise ValueError(f"{message} Received: batch of {size}")
        if sample_weight is None:
            rows = tf.shape(x)[0]
        else:
            weight = tf.reshape(tf.convert_to_tensor(sample_weight), [-1])
            rows = tf.reduce_sum(tf.cast(weight > 0, tf.int32))
        return Guard(message, sum_over_replicas(rows) <= limit)

    def input_shape_guard(self, x: tf.Tensor) -> Guard:
        """Samples must have the metadata's input shape: the bounds of layers
        such as DP_AddBias and the convolutions' certificates are computed for
        it (static shapes are refused at trace time)."""
        expected = tuple(self.dataset_metadata.input_shape)
        received = tuple(x.shape[1:])
        message = (
            f"Samples must have the shape of dataset_metadata.input_shape "
            f"{expected}: the gradient bounds are computed for it."
        )
        if len(received) != len(expected) or any(
            r is not None and r != e for r, e in zip(received, expected, strict=True)
        ):
            raise ValueError(f"{message} Received: {received}")
        return Guard(
            message,
            tf.reduce_all(tf.equal(tf.shape(x)[1:], tf.constant(expected, tf.int32))),
        )

    def noise_groups(
        self,
        variables: Sequence[keras.Variable],
        sensitivities: Sequence[tf.Tensor],
        coefficients: Sequence[float] | None,
    ) -> list[NoiseGroup]:
        """Global strategy (or `coefficients` None): one group of every
        variable, multiplier sigma and sensitivity sqrt(sum_l s_l^2). Per-layer:
        one group per variable, multiplier sigma * c_l and sensitivity s_l."""
        sigma = float(self.dp_parameters.noise_multiplier)
        variables, sensitivities = tuple(variables), list(sensitivities)
        if coefficients is None or self.dp_parameters.noisify_strategy == "global":
            stacked = tf.stack(sensitivities)
            peak = tf.reduce_max(stacked)
            total = stable_norm(stacked, axis=0)[0]  # no square under/overflows
            total = tf.where(tf.math.is_finite(peak), total, peak)  # inf stays inf
            return [NoiseGroup(variables, sigma, total)]
        return [
            NoiseGroup((v,), sigma * float(c), s)
            for v, s, c in zip(variables, sensitivities, coefficients, strict=True)
        ]

    def joint_noise_group(self, variables, sensitivity: float) -> list[NoiseGroup]:
        """One group of every variable with a given joint sensitivity (DP-SGD:
        the clipping norm)."""
        return [
            NoiseGroup(
                tuple(variables),
                float(self.dp_parameters.noise_multiplier),
                tf.constant(float(sensitivity), tf.float32),
            )
        ]

    def _standard_normal(self, size: int, draw: tf.Tensor | bool = True) -> tf.Tensor:
        """`size` standard normals, unique to (key, step, draw in this process);
        zeros where `draw` is False (the draw counter advances either way, so
        every replica's copy of it stays the same)."""
        seed = tf.random.experimental.stateless_fold_in(
            tf.random.experimental.stateless_fold_in(
                tf.constant(self._key, tf.int64), self.steps.value
            ),
            self._draws.read_value(),
        )
        with tf.control_dependencies([seed]):
            increment = self._draws.assign_add(1)
        with tf.control_dependencies([increment]):
            if draw is True:
                return tf.random.stateless_normal((size,), seed=seed)
            return tf.cond(
                draw,
                lambda: tf.random.stateless_normal((size,), seed=seed),
                lambda: tf.zeros((size,)),
            )

    def privatize(
        self,
        summed_gradients: Sequence[tf.Tensor],
        variables: Sequence[keras.Variable],
        groups: Sequence[NoiseGroup],
        optimizer=None,
    ) -> list[tf.Tensor]:
        """`(sum_i g_i + noise) / B` per variable, and the step recorded.

        One standard-normal draw per step, split across the variables (so no
        two variables share noise), scaled by each group's std; then divided
        by the expected batch size B (the one place B scales a gradient).
        The step's accounted multiplier comes from the same groups and is
        written to the ledger in the same graph; if the ledger cannot take it,
        the update is zeroed (nothing is released unrecorded).

        Under several replicas (`distribution`), each replica passes the sum
        over ITS samples; only the first adds the noise, whose std uses the
        largest replica sensitivity, and B stays the global expected batch
        size. Unless `optimizer` only sums the replicas' gradients
        (`distribution.sums_replica_gradients`), the noisy sums are
        all-reduced here and every replica returns 1/R of the released
        update: whatever the optimizer does to a replica's gradient before
        its own all-reduce (e.g. `clipnorm`) then acts on the released value
        only (post-processing).

        Args:
            summed_gradients: per variable, the sum over the batch of each
                sample's (weighted, clipped) gradient.
            variables: the trainable variables, in the same order.
            groups: `noise_groups` / `joint_noise_group` of these variables.
            optimizer: the optimizer the update goes to (None: assume it
                may transform each replica's gradient).
        """
        self.record.note_stepped(variables)  # this step may run: they are ours
        require_gradients(summed_gradients, variables)
        # Under several replicas: each group's largest replica sensitivity
        # (one all-reduce for all groups).
        sensitivities = max_over_replicas(
            tf.stack([tf.cast(g.sensitivity, tf.float32) for g in groups])
        )
        std_of, margin = {}, self.noise_margin()
        for k, group in enumerate(groups):
            for v in group.variables:
                std_of[id(v)] = group.noise_multiplier * sensitivities[k] * margin
        missing = [v.path for v in variables if id(v) not in std_of]
        if missing:
            raise ValueError(f"Trainable variables without a noise group: {missing}")
        sizes = [int(np.prod(v.shape)) for v in variables]
        # One draw per GLOBAL step: under several replicas only the first draws
        # and adds it (the replicas' updates are summed; distribution.py).
        noise = self._standard_normal(sum(sizes), is_first_replica())
        pieces = tf.split(noise, sizes)
        recorded = self._record_step(
            effective_noise_multiplier([g.noise_multiplier for g in groups])
        )
        keep = tf.cast(recorded, tf.float32)
        scale = keep / float(self.expected_batch_size)
        noisy = [
            tf.cast(
                (tf.cast(g, tf.float32) + tf.reshape(z, tf.shape(g)) * std_of[id(v)])
                * scale,
                g.dtype,
            )
            for g, z, v in zip(summed_gradients, pieces, variables, strict=True)
        ]
        if not sums_replica_gradients(optimizer, variables):
            noisy = released_on_every_replica(noisy)
        return release_after_all(noisy)

    def _record_step(self, noise_multiplier: float) -> tf.Tensor:
        """Count one gradient step in the ledger (graph); True if recorded."""
        self.steps.assign_add(1)
        return self._record(
            _STEPS,
            noise_multiplier,
            self.dataset_metadata.sampling_rate,
            1,
            tf.cast(self.sampling_code.read_value(), tf.float64),
        )

    def _record(self, mechanism, parameter, rate, count, sampling) -> tf.Tensor:
        """Add `count` runs of a mechanism to its ledger row (a new row if it
        never ran), in the saved ledger and in the shadow ledger of this
        process. Composition is commutative, so rows are a multiset. Returns
        whether both could take it."""
        key = tf.stack(
            [
                tf.constant(mechanism, tf.float64),
                tf.constant(parameter, tf.float64),
                tf.constant(rate, tf.float64),
                tf.cast(sampling, tf.float64),
            ]
        )
        fresh = tf.equal(tf.convert_to_tensor(self._shadow_size), 0)
        for base, saved_state in (
            (self._base_table, self.ledger_table),
            (self._base_size, self.ledger_size),
            (self._base_lineage, self.lineage),
        ):
            base.assign(
                tf.where(
                    fresh,
                    tf.convert_to_tensor(saved_state),
                    tf.convert_to_tensor(base),
                )
            )
        self._shadow_table.assign(
            tf.where(
                fresh,
                tf.convert_to_tensor(self.ledger_table),
                tf.convert_to_tensor(self._shadow_table),
            )
        )
        self._shadow_size.assign(
            tf.where(
                fresh,
                tf.convert_to_tensor(self.ledger_size),
                tf.convert_to_tensor(self._shadow_size),
            )
        )
        process = tf.constant(self._process_lineage, tf.int64)
        # Back at exactly the start state (a restore of it): the shadow holds
        # everything since, so the saved ledger rejoins this process's run.
        at_base = (
            tf.equal(tf.convert_to_tensor(self.lineage), self._base_lineage)
            & tf.equal(tf.convert_to_tensor(self.ledger_size), self._base_size)
            & tf.reduce_all(
                tf.equal(tf.convert_to_tensor(self.ledger_table), self._base_table)
            )
        )
        self.lineage.assign(
            tf.where(fresh | at_base, process, tf.convert_to_tensor(self.lineage))
        )
        self._shadow_lineage.assign(process)
        saved = _upsert(self.ledger_table, self.ledger_size, key, count)
        shadow = _upsert(self._shadow_table, self._shadow_size, key, count, saved)
        return saved & shadow

    # --------------------------------------------------------------- data
    def check_training_data(
        self,
        x,
        *,
        batch_size=None,
        shuffle=True,
        validation_split=0.0,
        strategy: tf.distribute.Strategy | None = None,
    ) -> str:
        """Check that `fit`'s data can come from the declared sampling and
        record which sampling runs; returns its label.

        Accepted: a dataset built by `data.poisson_batches` /
        `data.shuffled_batches` / `data.from_numpy` (or one the user vouches
        for with `data.declare_sampling`) whose sample count, expected batch
        size and sampling match the metadata; or, for shuffled sampling,
        arrays with `batch_size == B`, `shuffle=True` and N training rows.

        Args:
            strategy: the model's strategy (default: the one in scope). Under
                several workers only a distributed dataset is accepted; a
                distributed dataset must be this strategy's.

        Raises:
            ValueError: anything else, naming the mismatch.
        """
        meta = self.dataset_metadata
        strategy = strategy or tf.distribute.get_strategy()
        if isinstance(x, tf.distribute.DistributedDataset) and (
            getattr(x, "_strategy", None) is not strategy
        ):
            raise ValueError(
                "This distributed dataset was made for another strategy than "
                "the model's: its batches would be split for another number of "
                "replicas (rows dropped by their position in the batch). Build "
                "it with the model's distribute_strategy."
            )
        if num_workers(strategy) > 1 and not isinstance(
            x, tf.distribute.DistributedDataset
        ):
            raise ValueError(
                "Under several workers, fit() takes the distributed dataset of "
                "distribution.distributed_poisson_batches: arrays or a tf.data "
                "dataset would be sharded by batches, so a step's union over "
                f"the workers would not be a Poisson sample. Received: "
                f"{type(x).__name__}"
            )
        if isinstance(x, tf.data.Dataset | tf.distribute.DistributedDataset):
            code = self._dataset_sampling_code(x)
        elif isinstance(x, np.ndarray | tf.Tensor) or hasattr(x, "__array__"):
            rows = int(np.shape(x)[0])
            validation_split = validation_split or 0.0  # None: none, as Keras
            if not 0.0 <= validation_split < 1.0:  # NaN too
                raise ValueError(
                    "validation_split must lie in [0, 1) (a negative one trained "
                    "every row while the check counted more). Received: "
                    f"validation_split={validation_split!r}"
                )
            if validation_split:
                rows = int(math.floor(rows * (1.0 - validation_split)))
            batch = 32 if batch_size is None else batch_size
            problems = []
            if meta.sampling != "shuffle":
                problems.append(
                    f"fit() on arrays cuts shuffled batches but the metadata "
                    f"declares {meta.sampling!r} sampling (use data.poisson_batches)"
                )
            if batch != meta.batch_size:
                problems.append(
                    f"batch_size={batch} but the metadata's B is {meta.batch_size}"
                )
            if shuffle is not True:
                problems.append(f"shuffle={shuffle!r} (must be True)")
            if rows != meta.nb_samples_train:
                problems.append(
                    f"{rows} training rows but the metadata's N is "
                    f"{meta.nb_samples_train}"
                )
            if problems:
                raise ValueError(
                    "fit()'s data cannot come from the declared sampling, so the "
                    f"epsilon would be false. Received: {'; '.join(problems)}"
                )
            code = SHUFFLE
        else:
            raise ValueError(
                "A DP model's fit() takes arrays or a dataset built by "
                "deel_lipdp_ext.data (generators and other inputs cannot be "
                "checked against the declared sampling). "
                f"Received: {type(x).__name__}"
            )
        self._checked_sampling = code
        return SAMPLING_LABELS[code]

    @contextlib.contextmanager
    def steps_of_checked_sampling(self, checked: bool = True):
        """While the owner's train function runs fit's own call (`checked`):
        its steps carry the sampling `check_training_data` found. Any other
        step (a `train_step` or train function called from a callback during
        fit, `train_on_batch`) stays 'unverified'."""
        self.sampling_code.assign(self._checked_sampling if checked else UNVERIFIED)
        try:
            yield
        finally:
            self.sampling_code.assign(UNVERIFIED)

    def dataset_sampling(self, dataset: tf.data.Dataset) -> str:
        """The sampling label of a dataset that reads the training data (for a
        release accounted at the metadata's sampling rate).

        Raises:
            ValueError: a dataset not built by `deel_lipdp_ext.data` (nor
                declared), or one whose N, B or sampling differ from the
                metadata's.
        """
        return SAMPLING_LABELS[self._dataset_sampling_code(dataset)]

    def _dataset_sampling_code(self, dataset) -> int:
        meta = self.dataset_metadata
        provenance = sampling_provenance(dataset)
        if provenance is None:
            raise ValueError(
                "This tf.data.Dataset was not built by deel_lipdp_ext (or was "
                "transformed afterwards), so nothing says its batches are "
                f"{meta.sampling} batches of expected size {meta.batch_size} over "
                f"{meta.nb_samples_train} samples. Build it with "
                "data.poisson_batches / data.shuffled_batches / data.from_numpy, "
                "or vouch for it with data.declare_sampling(dataset, "
                "dataset_metadata)."
            )
        mismatch = [
            f"{name}: data {got!r} vs metadata {want!r}"
            for name, got, want in (
                ("sampling", provenance.sampling, meta.sampling),
                ("nb_samples_train", provenance.nb_samples, meta.nb_samples_train),
                ("batch_size", provenance.batch_size, meta.batch_size),
            )
            if got != want
        ]
        if provenance.shard > 1:
            mismatch.append(
                f"shard: one of {provenance.shard} shards of each batch (only "
                "distribution.distributed_poisson_batches trains on all of them)"
            )
        if mismatch:
            raise ValueError(
                "The training data does not match the model's dataset_metadata, "
                "so the accountant would describe another mechanism. "
                f"Received: {'; '.join(mismatch)}"
            )
        if provenance.declared:
            return DECLARED
        if provenance.sampling == "shuffle":
            return SHUFFLE
        return POISSON_SEEDED if provenance.seeded else POISSON

    def use_unverified_sampling(self) -> None:
        """Steps run outside `fit` (train_on_batch, custom loops) are recorded
        as 'unverified': the caller vouches for the sampling."""
        self._checked_sampling = UNVERIFIED
        self.sampling_code.assign(UNVERIFIED)

    # ----------------------------------------------------------- accounting
    def record_release(self, release: Release, sampling: str = "") -> None:
        """Add a private release (e.g. a clipping update) to the ledger: nothing
        that reads the data is left out. The name is a label only: rows are
        keyed by the mechanism."""
        if not isinstance(release, Release):
            raise TypeError(f"Expected a Release. Received: {release!r}")
        if release.sampling_rate == 1.0:
            code = NOT_SUBSAMPLED
        else:
            code = SAMPLING_LABELS.index(sampling) if sampling else UNVERIFIED
        mechanism = _GAUSSIAN if release.mechanism == "gaussian" else _PURE_DP
        if release.count == 0:
            return
        for check in list(self.step_checks):
            check((release,))  # a budget may refuse it before it happens
        recorded = self._record(
            mechanism,
            release.parameter,
            release.sampling_rate,
            release.count,
            code,
        )
        if not bool(recorded):
            raise ValueError(
                f"The privacy ledger is full ({LEDGER_CAPACITY} distinct "
                f"mechanisms): the release {release.name!r} cannot be recorded, so "
                "it must not happen."
            )

    def ledger(self) -> tuple[Release, ...]:
        """Everything that ran, one `Release` per distinct mechanism (gradient
        steps included, under the name `GRADIENT_STEPS`).

        The saved ledger and this process's shadow ledger (which starts from
        the saved rows at this process's first record) are combined: if the
        saved state was written by this process after that point (same
        lineage), each row counts the most either saw (a rollback does not
        undo what ran); if it is exactly the state this process started from,
        the shadow holds everything; otherwise (another run, or an older
        state) the counts add up: over-counting, never under.
        """
        combined = self._combined_rows()
        return tuple(
            Release(
                _RELEASE_NAMES[mechanism],
                "pure_dp" if mechanism == _PURE_DP else "gaussian",
                parameter,
                rate,
                count,
                SAMPLING_LABELS[sampling],
            )
            for (mechanism, parameter, rate, sampling), count in combined.items()
            if count > 0
        )

    def _combined_rows(self) -> dict[tuple, int]:
        """The saved and shadow ledgers combined as `ledger()` describes."""
        saved = _rows(self.ledger_table, self.ledger_size)
        shadow = _rows(self._shadow_table, self._shadow_size)
        lineage = int(self.lineage.numpy())
        if not shadow:  # nothing ran in this process
            return saved
        if lineage == int(self._shadow_lineage.numpy()):  # saved after it
            return {
                key: max(saved.get(key, 0), shadow.get(key, 0))
                for key in dict.fromkeys([*saved, *shadow])
            }
        if lineage == int(self._base_lineage.numpy()) and saved == _rows(
            self._base_table, self._base_size
        ):  # exactly the state this process started from: the shadow holds it
            return shadow
        # another run, or an earlier state: both counted (never under)
        return {
            key: saved.get(key, 0) + shadow.get(key, 0) for key in {*saved, *shadow}
        }

    def persist_ledger(self) -> None:
        """Write the combined ledger (`ledger()`: what ran, rollbacks
        included) and the step count (`steps_taken()`) into the saved
        variables, under this process's lineage.

        The owning model calls it whenever its variables leave it or older
        ones come in (`get_weights`, saving, checkpoints; after `set_weights`
        and `load_weights`), so state exported after a rollback
        (`EarlyStopping(restore_best_weights=True)`, `set_weights`) carries
        everything that ran, not the rolled-back rows. Eager only.
        """
        if int(self._shadow_size.numpy()) == 0:  # nothing ran in this process
            return
        combined = self._combined_rows()
        self.steps.assign(self._steps_in(combined))
        if len(combined) > LEDGER_CAPACITY:
            raise RuntimeError(
                f"The privacy ledger holds more than {LEDGER_CAPACITY} distinct "
                "mechanisms: it cannot be saved."
            )
        table = np.zeros((LEDGER_CAPACITY, 5))
        for i, ((mechanism, parameter, rate, sampling), count) in enumerate(
            combined.items()
        ):
            table[i, [_MECHANISM, _PARAMETER, _RATE, _COUNT, _SAMPLING]] = [
                mechanism,
                parameter,
                rate,
                count,
                sampling,
            ]
        self.ledger_table.assign(table)
        self.ledger_size.assign(len(combined))
        self.lineage.assign(int(self._shadow_lineage.numpy()))

    def samplings(self) -> tuple[str, ...]:
        """The samplings of what was accounted with amplification by
        subsampling (the gradient steps, subsampled releases), as it ran."""
        return tuple(
            dict.fromkeys(r.sampling for r in self.ledger() if r.sampling_rate < 1)
        )

    def is_exact(self) -> bool:
        """Whether everything accounted as Poisson-subsampled ran on secret
        Poisson batches (the accountant's assumption); False if any step or
        release ran on shuffled, seeded, declared or unverified data."""
        return all(s == SAMPLING_LABELS[POISSON] for s in self.samplings())

    def current_step_multiplier(self, noise_multiplier: float | None = None) -> float:
        """The accounted multiplier of a step as the model is configured now."""
        sigma = (
            self.dp_parameters.noise_multiplier
            if noise_multiplier is None
            else noise_multiplier
        )
        coefficients = None
        if (
            self._noise_coefficients is not None
            and self.dp_parameters.noisify_strategy == "per-layer"
        ):
            coefficients = self._noise_coefficients()
        return step_noise_multiplier(sigma, coefficients)

    def planned_ledger(
        self,
        epochs: int,
        *,
        first_epoch: int = 0,
        noise_multiplier: float | None = None,
        schedules: Sequence[ReleaseSchedule] | None = None,
    ) -> tuple[Release, ...]:
        """What `epochs` more epochs would add, starting at epoch `first_epoch`:
        their steps at the current configuration and the releases the
        schedules plan for them."""
        meta = self.dataset_metadata
        planned = [
            Release(
                GRADIENT_STEPS,
                "gaussian",
                self.current_step_multiplier(noise_multiplier),
                meta.sampling_rate,
                epochs * meta.nb_steps_per_epoch,
                meta.sampling,
            )
        ]
        for schedule in self.release_schedules if schedules is None else schedules:
            for epoch in range(first_epoch, first_epoch + epochs):
                release = schedule.scheduled_release(epoch)
                if release is not None:
                    planned.append(release)
        return merge_releases(planned)

    def event(self, planned: Sequence[Release] = ()) -> dp_accounting.DpEvent:
        """The dp-accounting event of the ledger (what ran) and `planned`."""
        return make_dp_event((*self.ledger(), *planned))

    @property
    def delta(self) -> float:
        return float(self.dp_parameters.delta)

    def epsilon(
        self, accountant: str = "rdp", planned: Sequence[Release] = ()
    ) -> float:
        """Epsilon of what ran (and of `planned`, for budget checks)."""
        return compute_epsilon(self.event(planned), self.delta, accountant)

    def calibrate_noise_multiplier(
        self,
        target_epsilon: float,
        epochs: int,
        accountant: str = "rdp",
        *,
        schedules: Sequence[ReleaseSchedule] | None = None,
        tolerance: float = 1e-3,
    ) -> float:
        """The smallest sigma for which what ran plus `epochs` more epochs of
        THIS mechanism (strategy and nm_coefs, and the releases that the
        schedules plan) stays within `target_epsilon`. Apply it with the
        model's `set_noise_multiplier`.

        Schedules default to the callbacks attached to the model (a
        dynamic-clipping callback attaches itself in `set_model(model)`, which
        `fit` calls; call it first to calibrate before fitting).
        """
        check_accountant(accountant)
        first = self.completed_epochs()

        def make_event(sigma: float) -> dp_accounting.DpEvent:
            return self.event(
                self.planned_ledger(
                    epochs,
                    first_epoch=first,
                    noise_multiplier=sigma,
                    schedules=schedules,
                )
            )

        return calibrate_noise_multiplier(
            target_epsilon,
            self.delta,
            accountant=accountant,
            make_event=make_event,
            tolerance=tolerance,
        )

    def max_epochs(
        self,
        epsilon_budget: float,
        accountant: str = "rdp",
        *,
        schedules: Sequence[ReleaseSchedule] | None = None,
        max_epochs: int = 10_000,
    ) -> int:
        """How many more epochs keep epsilon <= `epsilon_budget`."""
        first = self.completed_epochs()

        def make_event(epochs: int) -> dp_accounting.DpEvent:
            if epochs == 0:
                return self.event()
            return self.event(
                self.planned_ledger(epochs, first_epoch=first, schedules=schedules)
            )

        return get_max_epochs(
            epsilon_budget,
            make_event,
            accountant,
            delta=self.delta,
            max_epochs=max_epochs,
        )

    def epsilon_curve(
        self,
        epochs: int,
        accountant: str = "rdp",
        *,
        schedules: Sequence[ReleaseSchedule] | None = None,
    ) -> np.ndarray:
        """Epsilon after each of `epochs` epochs of a fresh run of this
        mechanism (see `accounting.epsilon_curve`)."""
        meta = self.dataset_metadata
        one_epoch = Release(
            GRADIENT_STEPS,
            "gaussian",
            self.current_step_multiplier(),
            meta.sampling_rate,
            meta.nb_steps_per_epoch,
            meta.sampling,
        )
        return epsilon_curve(
            [one_epoch],
            epochs,
            accountant,
            schedules=self.release_schedules if schedules is None else schedules,
            delta=self.delta,
        )

    def start_fit(self, initial_epoch: int) -> None:
        """Tie `fit`'s epoch index to the model's: its first epoch,
        `initial_epoch`, is the model's epoch `completed_epochs()`."""
        self._epoch_offset = self.completed_epochs() - int(initial_epoch)

    def model_epoch(self, fit_epoch: int) -> int:
        """The model's epoch (counted over all its training, as
        `planned_ledger` and `calibrate_noise_multiplier` count) of epoch
        `fit_epoch` of the running (or last) `fit`. Release schedules run on
        it: numbered by `fit`, a second `fit` without `initial_epoch` would
        release in epochs the budget did not plan (a review found epsilon
        2.66 for a budget of 1.73)."""
        return int(fit_epoch) + self._epoch_offset

    def steps_taken(self) -> int:
        """Gradient steps taken: the step counter, or the steps in `ledger()`
        if more (a restore rolls the counter back, not what ran)."""
        return self._steps_in(self._combined_rows())

    def _steps_in(self, rows: dict[tuple, int]) -> int:
        return max(int(self.steps.numpy()), _step_count(rows))

    def completed_epochs(self) -> int:
        """Epochs' worth of steps taken so far (`steps_taken()` // steps per
        epoch)."""
        return self.steps_taken() // self.dataset_metadata.nb_steps_per_epoch


def _upsert(table_var, size_var, key: tf.Tensor, count, enabled=True) -> tf.Tensor:
    """Add `count` to the row of a ledger table whose (mechanism, parameter,
    rate, sampling) is `key`, appending it if absent (graph or eager).
    Returns False (and changes nothing) if the table is full or not `enabled`."""
    table = tf.convert_to_tensor(table_var)
    size = tf.convert_to_tensor(size_var)
    used = tf.range(LEDGER_CAPACITY, dtype=tf.int64) < size
    columns = tf.gather(table, [_MECHANISM, _PARAMETER, _RATE, _SAMPLING], axis=1)
    matches = tf.reduce_all(columns == key, axis=1) & used
    found = tf.reduce_any(matches)
    index = tf.where(found, tf.argmax(tf.cast(matches, tf.int64)), size)
    recorded = (index < LEDGER_CAPACITY) & tf.convert_to_tensor(enabled)
    safe_index = tf.minimum(index, LEDGER_CAPACITY - 1)
    # gather, not table[index]: XLA needs a strided slice's bounds at compile
    # time, which made every ledger value a compile-time constant (one XLA
    # compilation per step).
    old = tf.where(found, tf.gather(table, safe_index), tf.zeros(5, tf.float64))
    row = tf.stack([key[0], key[1], key[2], old[_COUNT] + count, key[3]])
    new_table = tf.tensor_scatter_nd_update(table, [[safe_index]], [row])
    table_var.assign(tf.where(recorded, new_table, table))
    size_var.assign(tf.where(recorded & ~found, size + 1, size))
    return recorded


def _step_count(rows: dict[tuple, int]) -> int:
    """The gradient steps in ledger rows (`_rows`)."""
    return sum(count for (mechanism, *_), count in rows.items() if mechanism == _STEPS)


def _rows(table_var, size_var) -> dict[tuple, int]:
    """{(mechanism, parameter, rate, sampling code): count} of a ledger table."""
    rows = table_var.numpy()[: int(size_var.numpy())]
    return {
        (
            float(row[_MECHANISM]),
            float(row[_PARAMETER]),
            float(row[_RATE]),
            int(row[_SAMPLING]),
        ): int(row[_COUNT])
        for row in rows
    }


class HasPrivacyPlan:
    """Base of every DP model: the one public accessor, `privacy_plan`."""

    @property
    def privacy_plan(self) -> PrivacyPlan:
        return self._privacy_plan


def privacy_plan_of(source) -> PrivacyPlan:
    """The privacy plan of a DP model (or the plan itself).

    Raises:
        TypeError: `source` is neither.
    """
    if isinstance(source, PrivacyPlan):
        return source
    if isinstance(source, HasPrivacyPlan):
        return source.privacy_plan
    raise TypeError(
        "Expected a DP model (DPSequential, DPModel, DPSGDModel) or a PrivacyPlan. "
        f"Received: {type(source).__name__}"
    )


def release_after_all(noisy: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """The noisy gradients, each available only once ALL are computed.

    The optimizer writes a variable as soon as its own update is ready; the
    step's other updates may still be reading it (a gradient bound reads the
    certificates of the layers after it). The graph's automatic read-before-
    write order was not kept under CPU contention (about 1 step in 100 read a
    certificate after that layer's update), so the order is explicit here: no
    update can be written before every read of the step has happened.
    """
    with tf.control_dependencies(list(noisy)):
        return [tf.identity(g) for g in noisy]


_SEEDED_PLANS = itertools.count()


def _noise_key(seed: int | None) -> tuple[int, int]:
    """The secret key of the noise stream: OS entropy, or derived from a
    user seed and the number of seeded plans made before in this process (so
    two models built from one seed never share noise: the difference of their
    updates would cancel it), with a warning."""
    if seed is None:
        return (secrets.randbits(63), secrets.randbits(63))
    warnings.warn(
        f"DPParameters(seed={seed}) fixes the noise stream: runs are reproducible, "
        "and the privacy guarantee assumes the seed stays secret and is never "
        "reused for another run (two runs with one seed share their noise). Use "
        "seed=None (default) for noise keyed by the operating system's entropy.",
        ReproducibleNoiseWarning,
        stacklevel=3,
    )
    words = np.random.SeedSequence([seed, next(_SEEDED_PLANS)]).generate_state(
        4, np.uint32
    )
    return (
        int(words[0]) << 31 | int(words[1]) >> 1,
        int(words[2]) << 31 | int(words[3]) >> 1,
    )

"""Maximum differentiation (MAD) competition in TensorFlow.

Reference: plenoptic ``plenoptic.MADCompetition`` (v2 API; Wang and Simoncelli,
"Maximum differentiation competition", J. Vision 2008). Starting from a noisy
copy of ``image``, gradient steps minimise (``"min"``) or maximise (``"max"``)
``optimized_metric`` while holding ``reference_metric`` at its initial value:

    loss(x_hat) = t L1(x, x_hat) + lambda1 (T - L2(x, x_hat))**2 + lambda2 B(x_hat)

with ``t = +1`` ("min") or ``-1`` ("max"), ``T = L2(x, x_hat_0)`` and ``B`` the
penalty. Every public method, property and check of plenoptic is kept;
departures, for TensorFlow:

- images are channels-last Keras tensors; optimizers are Keras optimizer
  classes (``setup(optimizer=keras.optimizers.SGD, optimizer_kwargs={"lr": ..})``;
  ``lr`` is accepted for ``learning_rate``); a scheduler is a class called as
  ``scheduler(optimizer, **kwargs)`` whose ``step()`` (or ``step(loss)``) runs
  after each iteration;
- ``save`` writes an ``.npz`` container (arrays plus JSON metadata) instead of
  a pickle; ``load`` runs plenoptic's consistency checks on it; device checks
  and ``map_location`` have no TensorFlow counterpart;
- ``to(dtype)`` casts the images (no device move);
- kept as upstream, documented: ``reference_metric_loss`` and
  ``optimized_metric_loss`` are lagged (entry 0 is the value at setup, entry
  i >= 1 the value at iterate i - 1, so entries 0 and 1 are equal and the
  final image's value is not appended).
"""

from __future__ import annotations

import inspect
import json
import math
import warnings
from collections.abc import Callable
from typing import Literal

import keras
import numpy as np
import tensorflow as tf

from .validate import penalize_range, validate_input, validate_metric, validate_penalty

OBJECT_NAME = "deel_lipdp_ext.MADCompetition"
_CALLABLES = {
    "_optimized_metric": ("_image", "_mad_image"),
    "_reference_metric": ("_image", "_mad_image"),
    "_penalty_function": ("_image",),
}
_STATE = (
    "_image",
    "_mad_image",
    "_initial_image",
    "_reference_metric_target",
    "_metric_tradeoff_lambda",
    "_penalty_lambda",
    "_minmax",
    "_losses",
    "_penalties",
    "_gradient_norm",
    "_pixel_change_norm",
    "_optimized_metric_loss",
    "_reference_metric_loss",
    "_saved_mad_image",
    "_store_progress",
    "_current_loss",
    "_current_penalty",
)


class LoadWarning(UserWarning):
    """A consistency check of ``MADCompetition.load`` failed (raise_on_checks=False)."""


class MADCompetition:
    """Synthesise one maximally-differentiating image for two metrics.

    Args:
        image: reference image ``(B, H, W, C)``, float.
        optimized_metric: ``(x, y) -> scalar`` to minimise or maximise.
        reference_metric: ``(x, y) -> scalar`` held constant.
        minmax: ``"min"`` or ``"max"``.
        metric_tradeoff_lambda: weight of the reference term; None picks a power
            of 10 that roughly balances the two metrics (with a UserWarning).
        penalty_function: ``x_hat -> scalar`` penalty (default: range [0, 1]).
        penalty_lambda: non-negative weight of the penalty.

    Raises:
        Exception: negative ``penalty_lambda`` (as plenoptic).
        TypeError, ValueError: bad image dtype, metric, penalty or ``minmax``.
    """

    def __init__(
        self,
        image,
        optimized_metric: Callable,
        reference_metric: Callable,
        minmax: Literal["min", "max"],
        metric_tradeoff_lambda: float | None = None,
        penalty_function: Callable = penalize_range,
        penalty_lambda: float = 0.1,
    ):
        if penalty_lambda < 0:
            raise Exception("penalty_lambda must be non-negative!")
        image = tf.convert_to_tensor(image)
        validate_input(image)
        for metric in (optimized_metric, reference_metric):
            validate_metric(metric, tuple(image.shape), image.dtype)
        validate_penalty(penalty_function, tuple(image.shape), image.dtype)
        self._image = tf.identity(image)
        self._optimized_metric = optimized_metric
        self._reference_metric = reference_metric
        self._penalty_function = penalty_function
        self._penalty_lambda = float(penalty_lambda)
        if minmax not in ("min", "max"):
            raise ValueError(
                "synthesis_target must be one of {'min', 'max'}, but got "
                f"value {minmax} instead!"
            )
        self._minmax = minmax
        if metric_tradeoff_lambda is None:
            noise = tf.cast(tf.random.uniform(tuple(image.shape)), image.dtype)
            ratio = float(
                tf.reshape(optimized_metric(image, noise), ())
                / tf.reshape(reference_metric(image, noise), ())
            )
            metric_tradeoff_lambda = tradeoff_lambda_for_ratio(ratio)
            warnings.warn(
                "Since metric_tradeoff_lamda was None, automatically set to "
                f"{metric_tradeoff_lambda} to roughly balance metrics.",
                UserWarning,
                stacklevel=2,
            )
        self._metric_tradeoff_lambda = float(metric_tradeoff_lambda)
        self._losses: list[float] = []
        self._penalties: list[float] = []
        self._gradient_norm: list[float] = []
        self._pixel_change_norm: list[float] = []
        self._optimized_metric_loss: list[float] = []
        self._reference_metric_loss: list[float] = []
        self._saved_mad_image: list[np.ndarray] = []
        self._store_progress: int | None = None
        self._current_loss: float | None = None
        self._current_penalty: float | None = None
        self._mad_image: tf.Variable | None = None
        self._initial_image = None
        self._reference_metric_target: float | None = None
        self._optimizer = None
        self._scheduler = None
        self._scheduler_step_arg = False
        self._loaded = False

    # ---------------------------------------------------------------- setup
    def setup(
        self,
        initial_noise: float | None = None,
        optimizer: type | None = None,
        optimizer_kwargs: dict | None = None,
        scheduler: type | None = None,
        scheduler_kwargs: dict | None = None,
    ) -> None:
        """Initialises the MAD image (first call), the optimizer and the scheduler."""
        if self._mad_image is None:
            noise = 0.1 if initial_noise is None else float(initial_noise)
            start = self._image + tf.cast(
                noise * tf.random.normal(tuple(self._image.shape)), self._image.dtype
            )
            self._initial_image = tf.identity(start)
            self._mad_image = tf.Variable(start, name="mad_image")
            self._reference_metric_target = self._metric(self._reference_metric, start)
            self._reference_metric_loss.append(self._reference_metric_target)
            self._optimized_metric_loss.append(
                self._metric(self._optimized_metric, start)
            )
        elif not self._loaded:
            raise ValueError(
                "setup() can only be called once and must be called before "
                "synthesize()!"
            )
        elif initial_noise is not None:
            raise ValueError("Cannot set initial_noise after calling load()!")
        if self._loaded and isinstance(self._optimizer, tuple):
            self._setup_after_load(
                optimizer, optimizer_kwargs, scheduler, scheduler_kwargs
            )
        else:
            self._optimizer = _make_optimizer(optimizer, optimizer_kwargs)
            self._make_scheduler(scheduler, scheduler_kwargs)
        self._loaded = False

    def _make_scheduler(self, scheduler, scheduler_kwargs) -> None:
        if scheduler is None:
            self._scheduler = None
            return
        self._scheduler = scheduler(self._optimizer, **(scheduler_kwargs or {}))
        params = set(inspect.signature(self._scheduler.step).parameters) - {
            "self",
            "epoch",
        }
        self._scheduler_step_arg = bool(params)

    def _setup_after_load(
        self, optimizer, optimizer_kwargs, scheduler, scheduler_kwargs
    ):
        if optimizer_kwargs is not None or scheduler_kwargs is not None:
            raise ValueError(
                "When initializing optimizer/scheduler after load, optimizer_kwargs "
                "and scheduler_kwargs must be None (they are read from the saved "
                "file)."
            )
        saved_name, saved_config, saved_variables = self._optimizer
        chosen = keras.optimizers.Adam if optimizer is None else optimizer
        if chosen.__name__ != saved_name:
            raise ValueError(
                "User-specified optimizer must have same type as saved optimizer, but "
                f"got:\nUser-specified: {chosen.__name__}\nSaved: {saved_name}"
            )
        opt = chosen.from_config(saved_config)
        opt.build([self._mad_image])
        for variable, value in zip(opt.variables, saved_variables, strict=True):
            variable.assign(value)
        self._optimizer = opt
        saved_scheduler = self._scheduler
        if saved_scheduler is not None and scheduler is None:
            raise TypeError(
                f"Don't know how to initialize saved scheduler {saved_scheduler[0]}: "
                "pass its class to setup()."
            )
        if scheduler is not None:
            self._scheduler = scheduler(self._optimizer)
            if saved_scheduler is not None and hasattr(
                self._scheduler, "load_state_dict"
            ):
                self._scheduler.load_state_dict(saved_scheduler[1])
            params = set(inspect.signature(self._scheduler.step).parameters)
            self._scheduler_step_arg = bool(params - {"self", "epoch"})
        else:
            self._scheduler = None

    # ------------------------------------------------------------ objective
    def _metric(self, metric, mad_image, image=None) -> float:
        image = self._image if image is None else image
        return float(tf.reshape(metric(image, mad_image), ()))

    def objective_function(self, mad_image=None, image=None) -> tf.Tensor:
        """The synthesis loss (a scalar), or an empty tensor before setup."""
        if mad_image is None:
            if self._mad_image is None:
                return tf.zeros((0,))
            mad_image = self._mad_image
        image = self._image if image is None else image
        parts = self._loss_parts(mad_image, image)
        return parts[0]

    def _loss_parts(self, mad_image, image):
        sign = 1.0 if self._minmax == "min" else -1.0
        optimized = tf.reshape(self._optimized_metric(image, mad_image), ())
        reference = tf.reshape(self._reference_metric(image, mad_image), ())
        penalty = tf.reshape(self._penalty_function(mad_image), ())
        gap = self._reference_metric_target - reference
        loss = (
            sign * optimized
            + self._metric_tradeoff_lambda * gap**2
            + self._penalty_lambda * penalty
        )
        return loss, optimized, reference, penalty

    # ------------------------------------------------------------ synthesis
    def synthesize(
        self,
        max_iter: int = 100,
        store_progress: bool | int = False,
        stop_criterion: float = 1e-4,
        stop_iters_to_check: int = 50,
    ) -> None:
        """Runs up to ``max_iter`` steps; stops early when the loss settles."""
        if self._mad_image is None or isinstance(self._optimizer, tuple):
            if isinstance(self._optimizer, tuple) and self._optimizer[0] != "Adam":
                raise ValueError(
                    "Don't know how to initialize saved optimizer "
                    f"{self._optimizer[0]}: call setup() with it first."
                )
            self.setup()
        self._current_loss = None
        self._current_penalty = None
        progress = 1 if store_progress is True else (int(store_progress) or None)
        if self._losses and progress != self._store_progress:
            raise ValueError(
                "If you've already run synthesize() before, must re-run it with same "
                f"store_progress arg. You passed {store_progress} instead of "
                f"{self._store_progress or False} (True is equivalent to 1)"
            )
        self._store_progress = progress
        for _ in range(max_iter):
            if progress and len(self._losses) % progress == 0:
                self._saved_mad_image.append(self._mad_image.numpy().copy())
            previous = tf.identity(self._mad_image)
            with tf.GradientTape() as tape:
                loss, optimized, reference, penalty = self._loss_parts(
                    self._mad_image, self._image
                )
            gradient = tape.gradient(loss, self._mad_image)
            self._optimizer.apply([gradient], [self._mad_image])
            loss_value = float(loss)
            self._losses.append(loss_value)
            self._penalties.append(float(penalty))
            self._reference_metric_loss.append(float(reference))
            self._optimized_metric_loss.append(float(optimized))
            self._gradient_norm.append(float(tf.norm(gradient)))
            if self._scheduler is not None:
                if self._scheduler_step_arg:
                    self._scheduler.step(loss_value)
                else:
                    self._scheduler.step()
            self._pixel_change_norm.append(float(tf.norm(self._mad_image - previous)))
            if not math.isfinite(loss_value):
                raise ValueError("Found a NaN in loss during optimization.")
            if (
                len(self._losses) > stop_iters_to_check
                and abs(self._losses[-stop_iters_to_check] - self._losses[-1])
                < stop_criterion
            ):
                warnings.warn(
                    "Loss has converged, stopping synthesis", UserWarning, stacklevel=2
                )
                break
        self._current_loss = float(self.objective_function())
        self._current_penalty = float(
            tf.reshape(self._penalty_function(self._mad_image), ())
        )

    # ----------------------------------------------------------- properties
    def _with_current(self, history: list[float], current) -> tf.Tensor:
        if self._mad_image is None:
            return tf.zeros((0,))
        return tf.constant([*history, current], tf.float32)

    @property
    def losses(self) -> tf.Tensor:
        """Loss over iterations, the current image's last (length iterations + 1)."""
        if self._mad_image is None:
            return tf.zeros((0,))
        current = self._current_loss
        if current is None:
            current = float(self.objective_function())
        return self._with_current(self._losses, current)

    @property
    def penalties(self) -> tf.Tensor:
        """Penalty over iterations, the current image's last."""
        if self._mad_image is None:
            return tf.zeros((0,))
        current = self._current_penalty
        if current is None:
            current = float(tf.reshape(self._penalty_function(self._mad_image), ()))
        return self._with_current(self._penalties, current)

    @property
    def reference_metric_loss(self) -> tf.Tensor:
        """Reference metric over iterations (lagged, see the module doc)."""
        return tf.constant(self._reference_metric_loss, tf.float32)

    @property
    def optimized_metric_loss(self) -> tf.Tensor:
        """Optimized metric over iterations (lagged, see the module doc)."""
        return tf.constant(self._optimized_metric_loss, tf.float32)

    @property
    def gradient_norm(self) -> tf.Tensor:
        return tf.constant(self._gradient_norm, tf.float32)

    @property
    def pixel_change_norm(self) -> tf.Tensor:
        return tf.constant(self._pixel_change_norm, tf.float32)

    @property
    def saved_mad_image(self) -> tf.Tensor:
        """Stored images plus the current one, stacked on a new first axis."""
        images = list(self._saved_mad_image)
        if self._mad_image is not None:
            images.append(self._mad_image.numpy())
        if not images:
            return tf.zeros((0,))
        return tf.constant(np.stack(images))

    @property
    def image(self) -> tf.Tensor:
        return self._image

    @property
    def initial_image(self) -> tf.Tensor:
        return tf.zeros((0,)) if self._initial_image is None else self._initial_image

    @property
    def mad_image(self) -> tf.Tensor:
        if self._mad_image is None:
            return tf.zeros((0,))
        return tf.convert_to_tensor(self._mad_image)

    @property
    def optimized_metric(self) -> Callable:
        return self._optimized_metric

    @property
    def reference_metric(self) -> Callable:
        return self._reference_metric

    @property
    def penalty_function(self) -> Callable:
        return self._penalty_function

    @property
    def metric_tradeoff_lambda(self) -> float:
        return self._metric_tradeoff_lambda

    @property
    def penalty_lambda(self) -> float:
        return self._penalty_lambda

    @property
    def minmax(self) -> str:
        return self._minmax

    @property
    def optimizer(self):
        return self._optimizer

    @property
    def scheduler(self):
        return self._scheduler

    @property
    def store_progress(self) -> bool | int:
        return self._store_progress or False

    # -------------------------------------------------------------- progress
    def get_progress(self, iteration: int | None, iteration_selection: str = "round"):
        """Losses, norms, metric values (and stored image) at ``iteration``."""
        n = len(self.losses)
        it = n - 1 if iteration is None else iteration
        if it < 0:
            it = n + it
        if it < 0 or it >= n:
            raise IndexError(
                f"iteration={iteration} out of bounds with {n} iterations of synthesis"
            )
        last = it == n - 1
        progress = {
            "losses": float(self.losses[it]),
            "iteration": it,
            "penalties": float(self.penalties[it]),
            "pixel_change_norm": None if last else self._pixel_change_norm[it],
            "gradient_norm": None if last else self._gradient_norm[it],
            "reference_metric_loss": self._reference_metric_loss[it],
            "optimized_metric_loss": self._optimized_metric_loss[it],
        }
        if self._store_progress:
            step = self._store_progress
            if iteration is None:
                j = -1
            else:
                pick = {"floor": math.floor, "ceiling": math.ceil, "round": round}
                if iteration_selection not in pick:
                    raise ValueError(
                        "iteration_selection must be 'floor', 'ceiling' or 'round'. "
                        f"Received: {iteration_selection!r}"
                    )
                j = pick[iteration_selection](it / step)
            saved = self.saved_mad_image
            progress["saved_mad_image"] = saved[j]
            stored_it = (len(saved) - 1 if j == -1 else j) * step
            stored_it = min(stored_it, n - 1)
            if stored_it != it:
                warnings.warn(
                    "loss iteration and iteration for ['saved_mad_image'] are not the "
                    f"same ({it} vs {stored_it})",
                    UserWarning,
                    stacklevel=2,
                )
            progress["store_progress_iteration"] = stored_it
        return progress

    # ------------------------------------------------------------- save/load
    def save(self, file_path: str) -> None:
        """Writes the state, the callables' test outputs and the optimizer state."""
        arrays: dict[str, np.ndarray] = {}
        meta: dict = {
            "save_metadata": {
                "deel_lipdp_ext": _package_version(),
                "tensorflow": tf.__version__,
                "synthesis_object": OBJECT_NAME,
            },
            "attributes": {},
            "callables": {},
        }
        for name in _STATE:
            value = getattr(self, name)
            if isinstance(value, tf.Tensor | tf.Variable):
                arrays[name] = value.numpy()
                meta["attributes"][name] = {"array": name}
            elif name == "_saved_mad_image":
                for i, image in enumerate(value):
                    arrays[f"{name}_{i}"] = image
                meta["attributes"][name] = {"list_of_arrays": len(value)}
            else:
                meta["attributes"][name] = {"value": value}
        for name, inputs in _CALLABLES.items():
            function = getattr(self, name)
            args = [getattr(self, i) for i in inputs]
            output = None
            if all(a is not None for a in args):
                output = tf.convert_to_tensor(function(*args)).numpy()
                arrays[f"{name}_output"] = output
            meta["callables"][name] = {
                "name": _qualified_name(function),
                "inputs": list(inputs),
                "has_output": output is not None,
            }
        if isinstance(self._optimizer, keras.optimizers.Optimizer):
            variables = [v.numpy() for v in self._optimizer.variables]
            for i, v in enumerate(variables):
                arrays[f"_optimizer_variable_{i}"] = v
            meta["optimizer"] = [
                type(self._optimizer).__name__,
                _jsonable(self._optimizer.get_config()),
                len(variables),
            ]
        else:
            meta["optimizer"] = None
        if self._scheduler is not None:
            state = (
                self._scheduler.state_dict()
                if hasattr(self._scheduler, "state_dict")
                else {}
            )
            meta["scheduler"] = [type(self._scheduler).__name__, _jsonable(state)]
        else:
            meta["scheduler"] = None
        with open(file_path, "wb") as handle:
            np.savez(handle, __metadata__=np.array(json.dumps(meta)), **arrays)

    def load(
        self,
        file_path: str,
        raise_on_checks: bool = True,
        tensor_equality_atol: float = 1e-8,
        tensor_equality_rtol: float = 1e-5,
    ) -> None:
        """Loads a saved synthesis into this freshly built, identically configured
        object; each consistency check raises ValueError (or warns with
        ``raise_on_checks=False``)."""
        if self._mad_image is not None:
            raise ValueError(
                "load can only be called with a just-initialized MADCompetition object"
            )

        def warn_raise(message: str) -> None:
            if raise_on_checks:
                raise ValueError(message)
            warnings.warn(message, LoadWarning, stacklevel=3)

        def check_tensor(name, saved, current) -> None:
            saved, current = np.asarray(saved), np.asarray(current)
            if saved.dtype != current.dtype:
                raise ValueError(
                    f"Saved and initialized {name} have different dtype: "
                    f"{saved.dtype} vs {current.dtype}"
                )
            if saved.shape != current.shape and not (saved.size == current.size == 1):
                warn_raise(
                    f"Saved and initialized {name} have different shape: "
                    f"{saved.shape} vs {current.shape}"
                )
                return
            if not np.allclose(
                saved.reshape(current.shape),
                current,
                rtol=tensor_equality_rtol,
                atol=tensor_equality_atol,
            ):
                warn_raise(f"Saved and initialized {name} are different!")

        with np.load(file_path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        meta = json.loads(str(arrays.pop("__metadata__")))
        if meta["save_metadata"]["synthesis_object"] != OBJECT_NAME:
            warn_raise(
                f"Saved object was a {meta['save_metadata']['synthesis_object']}, but "
                f"initialized object is {OBJECT_NAME}."
            )
        saved_attributes = set(meta["attributes"])
        if saved_attributes != set(_STATE):
            warn_raise(
                "Saved and initialized attributes differ: "
                f"{sorted(saved_attributes ^ set(_STATE))}"
            )
        attributes = {}
        for name, entry in meta["attributes"].items():
            if "array" in entry:
                attributes[name] = arrays[entry["array"]]
            elif "list_of_arrays" in entry:
                attributes[name] = [
                    arrays[f"{name}_{i}"] for i in range(entry["list_of_arrays"])
                ]
            else:
                attributes[name] = entry["value"]
        check_tensor("_image", attributes["_image"], self._image.numpy())
        for name in ("_metric_tradeoff_lambda", "_penalty_lambda"):
            if not np.allclose(
                attributes[name],
                getattr(self, name),
                rtol=tensor_equality_rtol,
                atol=tensor_equality_atol,
            ):
                warn_raise(
                    f"Saved and initialized {name} are different! Initialized: "
                    f"{getattr(self, name)}, Saved: {attributes[name]}"
                )
        if attributes["_minmax"] != self._minmax:
            warn_raise(
                f"Saved and initialized _minmax are different! Initialized: "
                f"{self._minmax}, Saved: {attributes['_minmax']}"
            )
        for name, inputs in _CALLABLES.items():
            saved = meta["callables"][name]
            if saved["inputs"] != list(inputs):
                warn_raise(
                    f"Saved and initialized {name} take different inputs: "
                    f"{saved['inputs']} vs {list(inputs)}"
                )
                continue
            function = getattr(self, name)
            if saved["has_output"]:
                args = [tf.constant(attributes[i]) for i in inputs]
                current = tf.convert_to_tensor(function(*args)).numpy()
                check_tensor(f"{name} output", arrays[f"{name}_output"], current)
            if saved["name"].split(".")[-1] != _qualified_name(function).split(".")[-1]:
                warn_raise(
                    f"Saved and initialized {name} have different names: "
                    f"{saved['name']} vs {_qualified_name(function)}"
                )
        for name, value in attributes.items():
            if name == "_image":
                continue
            if name == "_mad_image":
                value = None if value is None else tf.Variable(value, name="mad_image")
            elif name == "_initial_image" and value is not None:
                value = tf.constant(value)
            elif name == "_saved_mad_image":
                value = [np.asarray(v) for v in value]
            setattr(self, name, value)
        if meta["optimizer"] is not None:
            opt_name, opt_config, count = meta["optimizer"]
            self._optimizer = (
                opt_name,
                opt_config,
                [arrays[f"_optimizer_variable_{i}"] for i in range(count)],
            )
        self._scheduler = (
            None if meta["scheduler"] is None else tuple(meta["scheduler"])
        )
        needs = []
        if meta["optimizer"] is not None and meta["optimizer"][0] != "Adam":
            needs.append("optimizer")
        if meta["scheduler"] is not None:
            needs.append("scheduler")
        if needs:
            warnings.warn(
                f"You will need to call setup() to instantiate {', '.join(needs)}",
                UserWarning,
                stacklevel=2,
            )
        self._loaded = True

    def to(self, dtype) -> MADCompetition:
        """Casts the images (reference, MAD, initial, saved) to a float ``dtype``."""
        dtype = tf.as_dtype(dtype)
        if not dtype.is_floating:
            raise ValueError(
                f"to() only accepts floating dtypes. Received: {dtype.name}"
            )
        self._image = tf.cast(self._image, dtype)
        if self._mad_image is not None:
            self._mad_image = tf.Variable(
                tf.cast(self._mad_image, dtype), name="mad_image"
            )
            self._initial_image = tf.cast(self._initial_image, dtype)
        self._saved_mad_image = [
            v.astype(dtype.as_numpy_dtype) for v in self._saved_mad_image
        ]
        return self


def tradeoff_lambda_for_ratio(ratio: float) -> float:
    """``10 ** round(log10(ratio))``, rounding halves to even (as ``torch.round``)."""
    return float(10 ** np.round(np.log10(ratio)))


def _make_optimizer(optimizer, optimizer_kwargs) -> keras.optimizers.Optimizer:
    kwargs = dict(optimizer_kwargs or {})
    if "lr" in kwargs:
        kwargs["learning_rate"] = kwargs.pop("lr")
    kwargs.setdefault("learning_rate", 0.01)
    if optimizer is None:
        kwargs.setdefault("amsgrad", True)
        return keras.optimizers.Adam(**kwargs)
    if not (
        isinstance(optimizer, type)
        and issubclass(optimizer, keras.optimizers.Optimizer)
    ):
        raise TypeError(
            "`optimizer` must be an uninitialised Keras optimizer class. "
            f"Received: {optimizer!r}"
        )
    return optimizer(**kwargs)


def _qualified_name(function) -> str:
    module = getattr(function, "__module__", None) or ""
    name = getattr(function, "__qualname__", None) or type(function).__qualname__
    return f"{module}.{name}" if module else name


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda v: getattr(v, "tolist", str)()))


def _package_version() -> str:
    from .. import __version__

    return __version__

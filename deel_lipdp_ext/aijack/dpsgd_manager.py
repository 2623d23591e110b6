"""AIJack's ``DPSGDManager`` for TensorFlow: lots, micro-batches and a DP optimizer.

Reference: AIJack ``aijack.defense.dp.manager`` (``DPSGDManager``,
``privatize``, its Poisson lot sampler and its optimizer wrapper), ported to
Keras 3 optimizers so that AIJack's training loop can be written with a
``tf.GradientTape``::

    dp_optimizer_cls, lot_loader, batch_loader = manager.privatize(sigma)
    optimizer = dp_optimizer_cls(learning_rate=0.05, momentum=0.9)
    optimizer.build(model.trainable_variables)  # needed if a lot may be empty
    for x_lot, y_lot in lot_loader(optimizer):
        for x_batch, y_batch in batch_loader((x_lot, y_lot)):
            optimizer.zero_grad()
            with tf.GradientTape() as tape:
                loss = loss_fn(y_batch, model(x_batch, training=False))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.step(grads, model.trainable_variables)

Semantics kept: ``step`` clips the micro-batch gradient (global norm over all
variables) to ``l2_norm_clip`` (less a margin, below) and accumulates it,
without updating; ``step_for_lot`` applies ``(acc + C sigma N(0, I)) *
batch_size / lot_size`` with the base optimizer and records one step in the
accountant; the lot loader draws ``iterations`` Poisson lots (each example with
probability ``lot_size / N``), calls ``step_for_lot`` before fetching each lot
but the first and once more when the loop ends normally (a ``break`` drops the
last lot), and ``zero_grad_for_lot`` after each fetch; batches are sequential
with the last short one dropped. Clipping is per example only with
``batch_size == 1``.

Departures (docs/ports.md, "AIJack", has the reasons and the figures):

- PyTorch optimizers hold gradients, Keras ones do not, so ``step`` takes
  ``(gradients, variables)`` and ``zero_grad`` has nothing to clear.
- Empty lots are not skipped (AIJack skips them): the loader yields every one
  of the ``iterations`` lots, an empty one as arrays of length 0, and each is
  a noisy step counted by the accountant. A noise-only step needs the
  variables: an optimizer that has had no ``step`` yet uses those it was
  built with (``optimizer.build(var_list)``) and raises otherwise.
- ``privatize`` refuses ``noise_multiplier <= 0`` (AIJack accepts 0 and applies
  a noise-free update) and the manager refuses ``l2_norm_clip <= 0``; the
  optimizer's ``noise_multiplier`` and ``l2_norm_clip`` and the manager's
  ``lot_size``, ``batch_size`` and data are read-only.
- The loop is the only update path. ``step`` takes the gradient of the
  micro-batch ``batch_loader`` yielded last, once (a step without one adds
  nothing and raises, XLA or not); ``batch_loader`` takes only the lot its
  ``lot_loader`` yielded last, in one pass;
  ``step_for_lot`` runs only from the loader, eagerly (not inside a
  ``tf.function``, where the accountant would count one trace, not every
  run); one ``lot_loader`` at a time per optimizer. Keras's
  ``apply_gradients``, ``apply``, ``stateless_apply`` and ``update_step``
  (so ``compile`` + ``fit``) raise: they apply a raw gradient with no
  clipping, no noise and no accounting.
- Clipping, the lot's sum and the noise are float64 (the noisy mean is cast
  to each variable's dtype); the clip aims at ``C (1 - 1e-6)`` so rounding
  stays below C; a gradient with a NaN or Inf contributes nothing. The step
  is recorded before the update is applied.
- Randomness: ``seed=None`` (the default) takes operating-system entropy. A
  fixed seed is folded with the number of seeded managers made before in the
  process; each pass of the lot loader also folds in its own index and the
  optimizer's ``iterations``, and each optimizer's noise stream its index and
  its ``iterations`` at its first noisy step: two managers from one seed, two
  optimizers of one manager and a run resumed once from a checkpoint never
  share lots or noise (a second resume of one checkpoint, like a second run
  of the program, replays them: a fixed seed is for one run).
- Layers that update state from the data in training mode (e.g.
  ``BatchNormalization``'s moving statistics) change the model outside the
  optimizer: no noise covers them. The manager never sees the model; call
  it with ``training=False`` or use no such layers.
- DPLIS smoothing (``smoothing=True``) is not ported and raises
  NotImplementedError.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf

from ..layers.base import BOUND_MARGIN
from ..privacy_plan import ReproducibleNoiseWarning


def _positive_finite(name: str, value) -> float:
    """``value`` as a float; ValueError unless it is finite and > 0."""
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be a number. Received: {name}={value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"`{name}` must be a number. Received: {name}={value!r}"
        ) from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(
            f"`{name}` must be a positive finite number. Received: {name}={value!r}"
        )
    return number


_SEEDED_MANAGERS = itertools.count()

#: spawn keys of the two kinds of streams under a manager's root
_LOTS, _NOISE = 0, 1


class _Untracked:
    """A plain holder: what it holds is invisible to TensorFlow's and Keras's
    tracking (and so to checkpoints and saved weights)."""

    def __init__(self, value):
        self.value = value


class _LoopState:
    """Where an optimizer is in its manager's loop (plain Python, untracked)."""

    def __init__(self):
        self.loader_open = False  # a lot_loader runs on this optimizer
        self.current_x = None  # the inputs and labels of the lot it yielded last
        self.current_y = None
        self.batched = False  # whether `batch_loader` ran over that lot
        # 1 while the micro-batch `batch_loader` yielded last has had no
        # `step`, else 0: a variable, so that a traced (or XLA-compiled)
        # `step` consumes it at every call, not at its trace.
        self.step_allowed = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.lot_rate = 0.0  # the Poisson rate its current lot was drawn at
        self.applying = False  # inside `step_for_lot`, called by the loader
        self.updating = False  # inside the base optimizer's apply


def _refuse_tracing(what: str) -> None:
    if tf.inside_function():
        raise RuntimeError(
            f"{what} must run eagerly, not inside a tf.function: the "
            "accountant records each step in Python, so a traced loop would "
            "count one trace while every call applies a noisy update, and the "
            "lots would be frozen into the graph. Trace only the gradient "
            "computation (and `step` if you like)."
        )


class DPSGDManager:
    """Builds the DP optimizer class and the lot / batch loaders.

    Args:
        accountant: an object with ``add_step_info(noise_params, q, steps)``
            (e.g. ``aijack.GeneralMomentAccountant``).
        optimizer_cls: a Keras optimizer class (e.g. ``keras.optimizers.SGD``).
        l2_norm_clip: C > 0, the bound on the L2 norm of each micro-batch
            gradient (global norm over all variables).
        dataset: ``(x, y)`` arrays with the same first dimension N.
        lot_size: expected lot size L (the Poisson rate is ``L / N``).
        batch_size: micro-batch size (1 for per-example clipping).
        iterations: lots drawn per pass of the lot loader.
        smoothing: DPLIS smoothing (not ported).
        smoothing_radius: DPLIS smoothing radius (not ported).
        seed: root of the lot sampler and of every optimizer's noise stream;
            ``None`` (the default) uses operating-system entropy. A fixed seed
            makes runs reproducible (for tests), with a warning: the privacy
            guarantee then assumes the seed is kept secret and never reused
            for another run.
    """

    def __init__(
        self,
        accountant,
        optimizer_cls: type,
        l2_norm_clip: float,
        dataset: Sequence[np.ndarray],
        lot_size: int,
        batch_size: int,
        iterations: int,
        smoothing: bool = False,
        smoothing_radius: float = 10.0,
        seed: int | None = None,
    ):
        if smoothing:
            raise NotImplementedError("DPLIS smoothing (smoothing=True) is not ported.")
        if not (
            isinstance(optimizer_cls, type)
            and issubclass(optimizer_cls, keras.optimizers.Optimizer)
        ):
            raise TypeError(
                "`optimizer_cls` must be a Keras optimizer class. "
                f"Received: {optimizer_cls!r}"
            )
        if not hasattr(accountant, "add_step_info"):
            raise TypeError(
                "`accountant` must have add_step_info (e.g. GeneralMomentAccountant). "
                f"Received: {type(accountant).__name__}"
            )
        _positive_finite("l2_norm_clip", l2_norm_clip)
        x, y = (np.asarray(a) for a in dataset)
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(
                "`dataset` must be (x, y) with the same, non-zero length. "
                f"Received: {len(x)} and {len(y)}"
            )
        for name, value in (
            ("lot_size", lot_size),
            ("batch_size", batch_size),
            ("iterations", iterations),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"`{name}` must be a positive int. Received: {value!r}"
                )
        if lot_size > len(x):
            raise ValueError(
                f"`lot_size` must not exceed the dataset size {len(x)}. "
                f"Received: lot_size={lot_size}"
            )
        if batch_size != 1:
            # Departure from AIJack: its micro-batches are cut sequentially, so
            # removing one record re-cuts every later micro-batch and moves the
            # accumulated sum by up to C times their number, while the noise and
            # the accountant assume C.
            raise ValueError(
                "`batch_size` must be 1 (per-example clipping): with sequential "
                "micro-batches of several examples one record changes every later "
                "micro-batch, so its influence exceeds the clipping norm the noise "
                f"is calibrated to. Received: batch_size={batch_size}"
            )
        if seed is not None:
            warnings.warn(
                f"DPSGDManager(seed={seed}) fixes the lots and the noise: runs are "
                "reproducible, and the privacy guarantee assumes the seed stays "
                "secret and is never reused for another run. Use seed=None "
                "(default) for the operating system's entropy.",
                ReproducibleNoiseWarning,
                stacklevel=2,
            )
        self.accountant = accountant
        self.optimizer_cls = optimizer_cls
        self.l2_norm_clip = l2_norm_clip
        self._x, self._y = x, y
        self._lot_size = lot_size
        self._batch_size = batch_size
        self._optimizer_classes: list[type] = []  # made by `privatize`
        self._optimizers_made = itertools.count()
        self._passes = itertools.count()
        self._open_loops: list[_LoopState] = []  # of optimizers in a lot_loader
        self.iterations = iterations
        self.smoothing = smoothing
        self.smoothing_radius = smoothing_radius
        self.seed = seed
        # One root per manager: a fixed seed is folded with the number of
        # seeded managers made before in this process (a sweep of managers
        # from one seed shared its lots: 1.34 reported for 7.05 in a review).
        self._root = np.random.SeedSequence(
            None if seed is None else [seed, next(_SEEDED_MANAGERS)]
        )

    @property
    def x(self) -> np.ndarray:
        """The inputs (read-only: N and the lots' rate are fixed)."""
        return self._x

    @property
    def y(self) -> np.ndarray:
        """The labels (read-only)."""
        return self._y

    @property
    def lot_size(self) -> int:
        """The expected lot size L (read-only)."""
        return self._lot_size

    @property
    def batch_size(self) -> int:
        """The micro-batch size: 1, fixed (checked once, in `__init__`)."""
        return self._batch_size

    @property
    def sampling_rate(self) -> float:
        return self.lot_size / len(self.x)

    def _stream(self, kind: int, index: int, iterations: int) -> np.random.SeedSequence:
        """The seed sequence of stream ``(kind, index)`` for an optimizer at
        ``iterations`` (a resumed run restores a later count: new streams)."""
        return np.random.SeedSequence(
            self._root.entropy,
            spawn_key=(*self._root.spawn_key, kind, index, int(iterations)),
        )

    def privatize(self, noise_multiplier: float):
        """``(dp_optimizer_cls, lot_loader, batch_loader)`` for noise ``sigma``.

        Args:
            noise_multiplier: sigma > 0; the noise std is ``sigma * C`` on the
                sum of a lot's clipped micro-batch gradients.

        Raises:
            ValueError: if ``noise_multiplier`` or ``l2_norm_clip`` is not a
                positive finite number.
        """
        sigma = _positive_finite("noise_multiplier", noise_multiplier)
        clip = _positive_finite("l2_norm_clip", self.l2_norm_clip)
        manager = self
        base = self.optimizer_cls

        class DPOptimizer(base):
            """``optimizer_cls`` that accumulates clipped micro-batch gradients and
            applies their noisy mean once per lot, inside the manager's loop."""

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self._dp_variables: list | None = None
                # Plain objects: never tracked, so never checkpointed (a
                # restored generator state would replay its noise).
                self._loop = _Untracked(_LoopState())
                self._noise = _Untracked(None)  # made at the first noisy step
                self._noise_index = next(manager._optimizers_made)

            @property
            def noise_multiplier(self) -> float:
                """sigma (read-only: the accountant records it per step)."""
                return sigma

            @property
            def l2_norm_clip(self) -> float:
                """C (read-only)."""
                return clip

            def zero_grad(self) -> None:
                """Nothing to clear: Keras optimizers do not hold gradients."""

            def _track(self, variables) -> None:
                self._dp_variables = list(variables)
                # Untracked: a checkpoint of the optimizer must never hold the
                # (noise-free) sum of a lot's clipped gradients. Float64 for
                # any variable dtype: clipped and summed in bfloat16, one
                # record's share reached 1.0076 C in a review.
                self._accumulator_holder = _Untracked(
                    [
                        tf.Variable(tf.zeros(v.shape, tf.float64), trainable=False)
                        for v in self._dp_variables
                    ]
                )

            @property
            def _accumulators(self):
                holder = getattr(self, "_accumulator_holder", None)
                return None if holder is None else holder.value

            def step(self, gradients, variables) -> None:
                """Clip the micro-batch gradient to C (global norm) and accumulate.

                The scale is ``min(C (1 - 1e-6) / (norm + 1e-6), 1)``, computed
                in float64 whatever the gradients' dtype (the margin absorbs
                float64 rounding of the norm). A gradient with a NaN or Inf
                contributes nothing (as in `DPSGDModel`); a ``None`` gradient
                is zero.

                One ``step`` per micro-batch that ``batch_loader`` yielded:
                without one (outside the loop, a second step for the same
                micro-batch, a gradient over the whole lot) the step adds
                nothing and, unless XLA-compiled (XLA drops asserts), raises.

                Raises:
                    tf.errors.InvalidArgumentError: no micro-batch of
                        ``batch_loader`` waits for this step (two steps per
                        example put one record into the sum twice: 2 C).
                    ValueError: ``variables`` are not those of the first
                        ``step`` (or of ``build`` when a lot came first).
                """
                variables = list(variables)
                if self._accumulators is None:
                    self._track(variables)
                if len(variables) != len(self._dp_variables) or any(
                    v is not w
                    for v, w in zip(variables, self._dp_variables, strict=False)
                ):
                    raise ValueError(
                        "`step` must get the variables of the first `step` (or "
                        "of `build`), in the same order: the lot's sum is kept "
                        "per variable. Received other variables"
                    )
                token = self._loop.value.step_allowed
                waiting = token.read_value()
                allowed = tf.debugging.assert_positive(
                    waiting,
                    message=(
                        "`step` takes the gradient of the micro-batch that "
                        "`batch_loader(lot)` yielded last, once: a step outside "
                        "the loop, a second step for one micro-batch or a "
                        "gradient over the whole lot puts a record into the "
                        "lot's sum more than once or above the clipping norm "
                        "C the noise is calibrated to"
                    ),
                )
                with tf.control_dependencies([waiting, allowed]):
                    token.assign(0)
                gradients = [
                    tf.zeros(v.shape, tf.float64)
                    if g is None
                    else tf.cast(tf.convert_to_tensor(g), tf.float64)
                    for g, v in zip(gradients, variables, strict=True)
                ]
                finite = tf.reduce_all(
                    [tf.reduce_all(tf.math.is_finite(g)) for g in gradients]
                )
                gradients = [tf.where(finite, g, tf.zeros_like(g)) for g in gradients]
                norm = tf.linalg.global_norm(gradients)
                # Aims at C * BOUND_MARGIN: the 1e-6 in the denominator alone
                # let float64 rounding reach 3.0000000000000004 at C = 3 for a
                # norm of 2.7e10 (a property test).
                limit = tf.constant(self.l2_norm_clip * BOUND_MARGIN, tf.float64)
                scale = tf.minimum(limit / (norm + 1e-6), 1.0)
                # Zero without a waiting micro-batch, even where XLA drops
                # the assert (a review: 65 steps summed on a lot of 13).
                scale = tf.where(waiting > 0, scale, tf.zeros_like(scale))
                with tf.control_dependencies([allowed]):
                    for acc, g in zip(self._accumulators, gradients, strict=True):
                        acc.assign_add(scale * g)

            def zero_grad_for_lot(self) -> None:
                if self._accumulators is not None:
                    for acc in self._accumulators:
                        acc.assign(tf.zeros_like(acc))

            def _noise_generator(self) -> tf.random.Generator:
                """This optimizer's Philox stream, made at its first noisy
                step from its index and its ``iterations`` then."""
                if self._noise.value is None:
                    sequence = manager._stream(
                        _NOISE, self._noise_index, int(self.iterations.numpy())
                    )
                    state = sequence.generate_state(3, np.uint64).view(np.int64)
                    self._noise.value = tf.random.Generator.from_state(
                        state, alg="philox"
                    )
                return self._noise.value

            def step_for_lot(self) -> None:
                """Noisy mean of the lot's clipped gradients, then the base step.

                Called by ``lot_loader`` (not by hand: a lot that the loader
                did not draw is not a Poisson lot). A lot without any ``step``
                (an empty lot) is a noise-only step. The noise is drawn and
                added in float64; only the noisy mean is cast to each
                variable's dtype. The accountant records the step before the
                update is applied.

                Raises:
                    RuntimeError: called by hand, or inside a tf.function; or
                        no ``step`` ran yet and the optimizer was not built,
                        so the variables to noise are unknown.
                """
                loop = self._loop.value
                if not loop.applying:
                    raise RuntimeError(
                        "`step_for_lot` is called by `lot_loader` when a lot "
                        "ends: a lot it did not draw is not the Poisson lot "
                        "the accountant records. Received: a call by hand"
                    )
                _refuse_tracing("`step_for_lot`")
                if self._accumulators is None:
                    built = list(getattr(self, "_trainable_variables", []) or [])
                    if not (self.built and built):
                        raise RuntimeError(
                            "A lot with no `step` (an empty lot) must still be a "
                            "noisy step, but this optimizer does not know its "
                            "variables yet: call "
                            "`optimizer.build(model.trainable_variables)` before "
                            "the loop. Received: an unbuilt optimizer before its "
                            "first `step`"
                        )
                    self._track(built)
                std = self.l2_norm_clip * self.noise_multiplier
                factor = manager.batch_size / manager.lot_size
                noise = self._noise_generator()
                noisy = [
                    tf.cast(
                        (acc + std * noise.normal(acc.shape, dtype=tf.float64))
                        * factor,
                        v.dtype,
                    )
                    for acc, v in zip(
                        self._accumulators, self._dp_variables, strict=True
                    )
                ]
                self.zero_grad_for_lot()  # nothing of the lot outlives its step
                # Recorded first: an update that fails after it is over-counted,
                # never missed.
                manager.accountant.add_step_info(
                    {"sigma": self.noise_multiplier}, loop.lot_rate, 1
                )
                loop.updating = True
                try:
                    super().apply(noisy, self._dp_variables)
                finally:
                    loop.updating = False

            # Keras's own update paths (`compile` + `fit`, `apply_gradients`,
            # `apply`, `stateless_apply`, `update_step`) would apply a raw
            # gradient: no clipping, no noise, nothing accounted.
            def _refuse_plain_update(self, method: str):
                raise RuntimeError(
                    f"`{method}` of a DP optimizer would apply a gradient with "
                    "no clipping, no noise and no accounting. Update only "
                    "through the manager's loop: `step(gradients, variables)` "
                    "per micro-batch and `lot_loader(optimizer)`, which calls "
                    "`step_for_lot`. `model.compile(optimizer=...)` + `fit` "
                    "is not a DP path for this optimizer"
                )

            def apply(self, grads, trainable_variables=None):
                self._refuse_plain_update("apply")

            def apply_gradients(self, grads_and_vars):
                self._refuse_plain_update("apply_gradients")

            def stateless_apply(self, optimizer_variables, grads, trainable_variables):
                self._refuse_plain_update("stateless_apply")

            def update_step(self, gradient, variable, learning_rate):
                if not self._loop.value.updating:
                    self._refuse_plain_update("update_step")
                return super().update_step(gradient, variable, learning_rate)

        DPOptimizer.__name__ = f"DP{base.__name__}"
        DPOptimizer.__qualname__ = DPOptimizer.__name__
        self._optimizer_classes.append(DPOptimizer)
        return DPOptimizer, self.lot_loader, self.batch_loader

    def _lots(self, optimizer) -> Iterator[tuple[np.ndarray, np.ndarray, float]]:
        """``iterations`` Poisson lots, empty ones included (length-0 arrays),
        each with the rate it was drawn at; one stream per pass."""
        q = self.sampling_rate
        rng = np.random.default_rng(
            self._stream(_LOTS, next(self._passes), int(optimizer.iterations.numpy()))
        )
        for _ in range(self.iterations):
            idx = np.flatnonzero(rng.random(len(self.x)) < q)
            yield self.x[idx], self.y[idx], q

    def lot_loader(self, dp_optimizer) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Poisson lots; applies each finished lot through ``dp_optimizer``.

        Runs eagerly, one at a time per optimizer; leaving it early (a
        ``break``) drops the current lot's sum.

        Raises:
            ValueError: an optimizer this manager's `privatize` did not make
                (another manager's would record its own sampling rate for
                these lots: 1.01 reported for 8.24 in a review).
            RuntimeError: another ``lot_loader`` is open on the optimizer
                (zipped or nested loaders put one record into one sum twice),
                or it runs inside a tf.function.
        """
        if not isinstance(dp_optimizer, tuple(self._optimizer_classes)):
            raise ValueError(
                "lot_loader takes an optimizer of a class this manager's "
                "privatize() returned: another manager's would account these "
                "lots at its own sampling rate and lot size. Received: "
                f"{type(dp_optimizer).__name__}"
            )
        _refuse_tracing("`lot_loader`")
        loop = dp_optimizer._loop.value
        if loop.loader_open:
            raise RuntimeError(
                "Another `lot_loader` is open on this optimizer: two loaders "
                "interleaved or nested put the examples of two lots into one "
                "noisy sum (a record in both counts twice: 2 C). Finish or "
                "close (`.close()`) the first one"
            )
        loop.loader_open = True
        self._open_loops.append(loop)
        first = True
        try:
            for x_lot, y_lot, q in self._lots(dp_optimizer):
                _refuse_tracing("`lot_loader`")
                if not first:
                    self._apply_lot(dp_optimizer)
                first = False
                dp_optimizer.zero_grad_for_lot()
                loop.lot_rate = q
                loop.current_x, loop.current_y, loop.batched = x_lot, y_lot, False
                yield x_lot, y_lot
            if not first:
                _refuse_tracing("`lot_loader`")
                self._apply_lot(dp_optimizer)
        finally:
            loop.loader_open = False
            loop.current_x = loop.current_y = None
            loop.step_allowed.assign(0)
            self._open_loops.remove(loop)
            dp_optimizer.zero_grad_for_lot()  # a dropped lot leaves nothing

    @staticmethod
    def _apply_lot(dp_optimizer) -> None:
        loop = dp_optimizer._loop.value
        loop.current_x = loop.current_y = None
        loop.step_allowed.assign(0)
        loop.applying = True
        try:
            dp_optimizer.step_for_lot()
        finally:
            loop.applying = False

    def batch_loader(self, lot) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Sequential micro-batches of ``batch_size`` (a short last one dropped)
        of the lot ``lot_loader`` yielded last, in one pass; each allows one
        ``step`` of the optimizer the lot belongs to.

        Raises:
            ValueError: ``lot`` is not the arrays a ``lot_loader`` of this
                manager yielded last (the whole training set, say).
            RuntimeError: a second pass over the lot.
        """
        x, y = lot
        loop = next(
            (
                loop
                for loop in self._open_loops
                if loop.current_x is x and loop.current_y is y
            ),
            None,
        )
        if loop is None:
            raise ValueError(
                "batch_loader takes the lot that lot_loader yielded last, as it "
                "came (the same arrays): other examples are not part of the "
                "Poisson lot the accountant records. Received: other arrays"
            )
        if loop.batched:
            raise RuntimeError(
                "batch_loader makes one pass over a lot: a second pass puts "
                "each record into the lot's sum twice (2 C)"
            )
        loop.batched = True
        size = self.batch_size
        try:
            for start in range(0, math.floor(len(x) / size) * size, size):
                if loop.current_x is not x:
                    return  # the loader has moved on: this lot is applied
                loop.step_allowed.assign(1)
                yield x[start : start + size], y[start : start + size]
                loop.step_allowed.assign(0)
        finally:
            if loop.current_x is x:
                loop.step_allowed.assign(0)

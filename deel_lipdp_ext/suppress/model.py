"""``SuppressModel`` (the masked train step) and ``SuppressMasker`` (its callback).

Reference: MindArmour ``SuppressModel`` / ``SuppressMasker``, ported to Keras 3.
The train step rewrites each masked gradient as ``g' = A + g * M`` before a
plain SGD step, where M (multiply-mask) and A (one-shot add-mask) live in the
model's non-trainable variables so the compiled step reads their current values.

Save/load: the masks are saved with the model (they are its weights) and the
controller (its arguments and schedule state) is saved in the model's config;
``keras.models.load_model`` returns a ``SuppressModel`` already linked to a
rebuilt controller in the same state, ready to resume with a new
``SuppressMasker(model, model.suppress_ctrl)``. MindArmour's eager-mode-only
restriction has no Keras counterpart: the step runs under ``tf.function``.
"""

from __future__ import annotations

import logging
import math

import keras
import tensorflow as tf

from .._keras_utils import pop_keras_objects
from ._checks import check_type
from .controller import SuppressCtrl

logger = logging.getLogger("deel_lipdp_ext.suppress")
_PACKAGE = "deel_lipdp_ext"

_SGD_REASON = (
    "the add-mask A = (w - target) / lr lands each weight on its target in one "
    "plain SGD step (w - lr * A); momentum, weight decay, gradient clipping or "
    "another optimizer would move the weights elsewhere"
)


def check_suppress_optimizer(optimizer, lr: float | None = None) -> None:
    """Refuses any optimizer but plain SGD (at learning rate ``lr`` if given)."""
    if optimizer is None:
        raise ValueError("SuppressModel needs an optimizer: keras.optimizers.SGD.")
    if not isinstance(optimizer, keras.optimizers.SGD):
        raise TypeError(
            f"SuppressModel needs keras.optimizers.SGD, because {_SGD_REASON}. "
            f"Received: {type(optimizer).__name__}"
        )
    config = optimizer.get_config()
    problems = []
    if config.get("momentum", 0.0) != 0.0:
        problems.append(f"momentum={config['momentum']}")
    if config.get("nesterov"):
        problems.append("nesterov=True")
    if config.get("weight_decay"):
        problems.append(f"weight_decay={config['weight_decay']}")
    for name in ("clipnorm", "clipvalue", "global_clipnorm"):
        if config.get(name) is not None:
            problems.append(f"{name}={config[name]}")
    if config.get("use_ema"):
        problems.append("use_ema=True")
    if config.get("gradient_accumulation_steps"):
        problems.append(
            f"gradient_accumulation_steps={config['gradient_accumulation_steps']}"
        )
    if isinstance(
        optimizer._learning_rate, keras.optimizers.schedules.LearningRateSchedule
    ):
        problems.append("a learning-rate schedule")
    elif lr is not None and not math.isclose(
        float(optimizer.learning_rate.numpy()), lr, rel_tol=1e-6
    ):
        problems.append(
            f"learning_rate={float(optimizer.learning_rate.numpy())} != the "
            f"controller's lr={lr}"
        )
    if problems:
        raise ValueError(
            f"SuppressModel needs plain SGD (no momentum) at the controller's "
            f"learning rate, because {_SGD_REASON}. Received: {', '.join(problems)}"
        )


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SuppressModel(keras.Model):
    """A Keras model whose train step applies the suppress-privacy masks.

    Args:
        network: the Keras model to train (built).
        loss_fn: its loss (a Keras loss, or anything ``compile`` accepts).
        optimizer: ``keras.optimizers.SGD`` without momentum, weight decay or
            gradient clipping, at the controller's ``lr``.
        **kwargs: ``metrics`` and other ``compile`` arguments, or Model arguments
            (``name``).

    Raises:
        TypeError: ``network`` is not a Keras model; ``optimizer`` is not SGD.
        ValueError: no optimizer, or SGD with momentum (or another extra).

    Example:
        >>> net = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
        >>> model = SuppressModel(net, keras.losses.CategoricalCrossentropy(),
        ...                       keras.optimizers.SGD(0.05), metrics=["accuracy"])
        >>> model.link_suppress_ctrl(ctrl)  # doctest: +SKIP
        >>> model.fit(x, y, epochs=10,  # doctest: +SKIP
        ...           callbacks=[SuppressMasker(model, ctrl)])
    """

    _COMPILE_KEYS = (
        "metrics",
        "loss_weights",
        "weighted_metrics",
        "run_eagerly",
        "steps_per_execution",
        "jit_compile",
        "auto_scale_loss",
    )

    def __init__(self, network, loss_fn, optimizer, **kwargs):
        compile_kwargs = {k: kwargs.pop(k) for k in self._COMPILE_KEYS if k in kwargs}
        super().__init__(**kwargs)
        check_type("network", network, (keras.Model,))
        self.network = network
        self.suppress_ctrl: SuppressCtrl | None = None
        self._mask_variables: dict[int, tuple] = {}
        self.suppress_started = self.add_weight(
            name="suppress_started", shape=(), initializer="zeros", trainable=False
        )
        self.compile(optimizer=optimizer, loss=loss_fn, **compile_kwargs)

    def compile(self, optimizer="rmsprop", loss=None, **kwargs):
        if isinstance(optimizer, str):
            optimizer = keras.optimizers.get(optimizer)
        lr = None if self.suppress_ctrl is None else self.suppress_ctrl.lr
        check_suppress_optimizer(optimizer, lr)
        super().compile(optimizer=optimizer, loss=loss, **kwargs)

    def compile_from_config(self, config):
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def link_suppress_ctrl(self, suppress_pri_ctrl: SuppressCtrl) -> None:
        """Links the controller: creates the mask variables and wires them in."""
        check_type("suppress_pri_ctrl", suppress_pri_ctrl, (SuppressCtrl,))
        if suppress_pri_ctrl.networks is not self.network:
            raise ValueError(
                "The controller was built on another network than this model's."
            )
        if self.suppress_ctrl is not None:
            raise ValueError("A SuppressCtrl is already linked to this model.")
        check_suppress_optimizer(self.optimizer, suppress_pri_ctrl.lr)
        trainable = self.network.trainable_variables
        was_locked = self._tracker.locked
        self._tracker.unlock()
        try:
            for j, (mask, de_weight) in enumerate(
                zip(
                    suppress_pri_ctrl.grads_mask_list,
                    suppress_pri_ctrl.de_weight_mask_list,
                    strict=True,
                )
            ):
                if not (mask.mask_able and de_weight.mask_able):
                    continue
                shape = tuple(trainable[j].shape)
                mul = self.add_weight(
                    name=f"suppress_mul_{j}",
                    shape=shape,
                    initializer="ones",
                    trainable=False,
                )
                add = self.add_weight(
                    name=f"suppress_add_{j}",
                    shape=shape,
                    initializer="zeros",
                    trainable=False,
                )
                armed = self.add_weight(
                    name=f"suppress_armed_{j}",
                    shape=(),
                    initializer="zeros",
                    trainable=False,
                )
                mask.variable = mul
                de_weight.variable, de_weight.armed_variable = add, armed
                mask.update()
                add.assign(de_weight.add_mask_array_flat.reshape(shape))
                armed.assign(1.0 if de_weight.just_update > 0 else 0.0)
                self._mask_variables[j] = (mul, add, armed)
        finally:
            if was_locked:
                self._tracker.lock()
        self.suppress_ctrl = suppress_pri_ctrl
        suppress_pri_ctrl.model = self
        suppress_pri_ctrl.mask_started = suppress_pri_ctrl.mask_started  # publish
        if not self._mask_variables:
            logger.warning("No mask layer to apply: suppress privacy is disabled.")
        self.train_function = None  # retrace with the masks

    def build(self, input_shape):
        if not self.network.built:
            self.network.build(input_shape)
        self.built = True

    def call(self, inputs, training=None):
        return self.network(inputs, training=training)

    def _suppress_gradients(self, gradients: list) -> list:
        """``g' = armed * A + g * M`` for every masked gradient, once started."""
        started = self.suppress_started > 0
        gradients = list(gradients)
        for j, (mul, add, armed) in self._mask_variables.items():
            g = tf.convert_to_tensor(gradients[j])
            masked = armed * add + g * mul
            gradients[j] = tf.where(started, masked, g)
        return gradients

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        variables = self.network.trainable_variables
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
        self._loss_tracker.update_state(loss, sample_weight=tf.shape(y_pred)[0])
        gradients = self._suppress_gradients(tape.gradient(loss, variables))
        self.optimizer.apply(gradients, variables)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def load_own_variables(self, store):
        super().load_own_variables(store)
        if self.suppress_ctrl is not None:
            for mask, de_weight in zip(
                self.suppress_ctrl.grads_mask_list,
                self.suppress_ctrl.de_weight_mask_list,
                strict=True,
            ):
                mask.pull()
                de_weight.pull()

    def get_config(self):
        config = super().get_config()
        config["network"] = keras.saving.serialize_keras_object(self.network)
        config["suppress_ctrl"] = (
            None if self.suppress_ctrl is None else self.suppress_ctrl.get_config()
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config, (network,) = pop_keras_objects(config, ("network",), custom_objects)
        ctrl_config = config.pop("suppress_ctrl", None)
        lr = ctrl_config["lr"] if ctrl_config else 0.05
        # The compiled loss and optimizer state are restored by load_model.
        model = cls(network, None, keras.optimizers.SGD(lr), **config)
        if ctrl_config is not None:
            model.link_suppress_ctrl(SuppressCtrl.from_config(network, ctrl_config))
        return model


class SuppressMasker(keras.callbacks.Callback):
    """Updates the masks after every training step (MindArmour's ``step_end``).

    The global step is the optimizer's iteration count (1-based after the
    step), so it carries over a resumed ``fit``; the epoch is Keras's (1-based).
    At each epoch end, ``logs`` get ``suppress_sparsity`` (the scheduled
    sparsity) and ``actual_sparsity_<layer_name>`` for every mask layer.

    Args:
        model: the ``SuppressModel`` being trained.
        suppress_ctrl: its linked ``SuppressCtrl``.

    Raises:
        TypeError: wrong argument types.
        ValueError: a step while the controller is not initialised; a ``fit``
            whose steps per epoch differ from ``batch_num``, or with
            ``steps_per_execution > 1`` (the masks must update between steps).
    """

    def __init__(self, model: SuppressModel, suppress_ctrl: SuppressCtrl):
        super().__init__()
        check_type("model", model, (SuppressModel,))
        check_type("suppress_ctrl", suppress_ctrl, (SuppressCtrl,))
        self._suppress_model = model
        self._suppress_ctrl = suppress_ctrl
        self._epoch = 0

    def on_train_begin(self, logs=None):
        if self._suppress_ctrl.model is not self._suppress_model:
            raise ValueError(
                "The controller is not linked to this model: call "
                "model.link_suppress_ctrl(ctrl) first."
            )
        if getattr(self._suppress_model, "steps_per_execution", 1) != 1:
            raise ValueError(
                "SuppressMasker needs steps_per_execution=1: the masks change "
                "between steps. Received: "
                f"steps_per_execution={self._suppress_model.steps_per_execution}"
            )
        steps = (self.params or {}).get("steps")
        if steps is not None and steps != self._suppress_ctrl.batch_num:
            raise ValueError(
                f"The fit runs {steps} steps per epoch but the controller's "
                f"batch_num is {self._suppress_ctrl.batch_num}: the schedule "
                "would be wrong."
            )

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        ctrl = self._suppress_ctrl
        if not ctrl.mask_initialized:
            raise ValueError("Not initialize network!")
        cur_step = int(self._suppress_model.optimizer.iterations.numpy())
        cur_epoch = self._epoch + 1
        cur_step_in_epoch = (cur_step - 1) % ctrl.batch_num + 1
        if cur_step_in_epoch % 100 == 1:
            combined, first, second = ctrl.calc_theoretical_sparse_for_conv()
            actual = ctrl.calc_actual_sparse_for_conv(ctrl.networks)
            logger.info(
                "step %d: theoretical sparsity %.4f (%.4f, %.4f), actual %.4f "
                "(%.4f, %.4f)",
                cur_step,
                combined,
                first,
                second,
                *actual,
            )
        ctrl.update_status(cur_epoch, cur_step, cur_step_in_epoch)
        if ctrl.to_do_mask:
            ctrl.update_mask(ctrl.networks, cur_step)
        elif ctrl.mask_started:
            ctrl.reset_zeros()

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        ctrl = self._suppress_ctrl
        logs["suppress_sparsity"] = float(ctrl.cur_sparse)
        for des in ctrl.mask_layers:
            name = des.layer_name.replace("/", "_")
            logs[f"actual_sparsity_{name}"] = ctrl.calc_actual_sparse_for_layer(
                ctrl.networks, des.layer_name
            )

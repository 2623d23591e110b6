"""Per-example clipping without per-example gradients ("ghost clipping").

DP-SGD needs every example's gradient norm ``||g_i||`` and the clipped sum
``sum_i c_i g_i`` with ``c_i = min(1, C / ||g_i||)``. Materialising the
``g_i`` (``tf.vectorized_map``) costs memory and time proportional to the
batch size times the parameter count. Here one batched forward pass records,
for each layer, its input ``a`` and the gradient ``delta`` of the summed loss
with respect to its pre-activation output (one backward pass to the
activations, no weight gradients). Since no layer mixes examples,
``delta_i`` is example i's own output gradient, and for a linear layer
``g_i = A_i^T Delta_i`` (``A_i``: its input rows, ``Delta_i``: the output
gradient rows; one row per sequence position or convolution patch), so:

* T = 1: ``||g_i|| = ||a_i|| ||delta_i||`` ("ghost norm") and
  ``sum_i c_i g_i = A^T (c Delta)``, one matmul over the batch;
* T > 1: the per-example ``A_i^T Delta_i`` are materialised (batch x
  kernel size, never batch x all parameters), and the clipped sum contracts
  them. The Gram form ``<A_i A_i^T, Delta_i Delta_i^T>`` is not used: float32
  rounding of its terms can make an example's norm far smaller than the
  norm of what is summed.

In every rule the clipped sum adds exactly the per-example vectors whose
norms were taken, so each example contributes at most C (up to float32
rounding of that one norm, below the 1e-6 margin the model clips at).

Layers: Dense, EinsumDense, Conv1D/Conv2D (patches of the input, with
strides, "valid"/"same" padding and dilation), Embedding (a row of the table
gets the gradients of every position holding its id). Any other layer with
weights (LayerNormalization, recurrent layers, custom layers...) gets its own
per-example gradients by a vectorised backward pass through that layer alone
(``delta_i`` pulled back through one example's call), not through the model.

Only networks whose every layer is a Keras layer known not to mix examples
are accepted (`ghost_clipping_support`): a layer that mixes examples would
make ``delta_i`` depend on the other examples and the clipping would not
bound example i's contribution. Examples whose gradient norm is not finite
(an overflowing forward pass) are dropped from the step, as in the
vectorised path.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import keras
import tensorflow as tf

from ._keras_utils import all_sublayers, per_example_map, turn_off_tensor_float_32
from .layers.base import example_squares

#: Layers whose clipping is computed from (input, output gradient) directly.
FAST_LAYERS = (
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Embedding,
)

_L = keras.layers
#: Keras layers that compute each example from that example alone, given
#: built-in activations and no axis on the batch (`_layer_problem`). Anything
#: else (custom layers, Lambda, BatchNormalization, preprocessing and
#: augmentation layers such as MixUp) is refused: one example could change
#: another's output gradient, and its clipping would bound nothing.
PER_EXAMPLE_LAYERS = tuple(
    getattr(_L, name)
    for name in (
        "InputLayer Dense EinsumDense Embedding Identity Masking Activation "
        "ReLU LeakyReLU PReLU ELU Softmax "
        "Conv1D Conv2D Conv3D Conv1DTranspose Conv2DTranspose Conv3DTranspose "
        "DepthwiseConv1D DepthwiseConv2D SeparableConv1D SeparableConv2D "
        "MaxPooling1D MaxPooling2D MaxPooling3D AveragePooling1D AveragePooling2D "
        "AveragePooling3D GlobalMaxPooling1D GlobalMaxPooling2D GlobalMaxPooling3D "
        "GlobalAveragePooling1D GlobalAveragePooling2D GlobalAveragePooling3D "
        "Flatten Reshape Permute RepeatVector Cropping1D Cropping2D Cropping3D "
        "ZeroPadding1D ZeroPadding2D ZeroPadding3D UpSampling1D UpSampling2D "
        "UpSampling3D Add Subtract Multiply Average Maximum Minimum Concatenate "
        "Dot LayerNormalization UnitNormalization GroupNormalization "
        "Dropout SpatialDropout1D SpatialDropout2D SpatialDropout3D GaussianNoise "
        "GaussianDropout AlphaDropout ActivityRegularization "
        "SimpleRNN LSTM GRU SimpleRNNCell LSTMCell GRUCell Bidirectional "
        "TimeDistributed Attention AdditiveAttention MultiHeadAttention"
    ).split()
)
_BUILTIN_ACTIVATIONS = tuple(
    getattr(keras.activations, name)
    for name in dir(keras.activations)
    if not name.startswith("_") and name not in ("get", "serialize", "deserialize")
)
#: Activations that reduce over an axis (the last one by default).
_REDUCING_ACTIVATIONS = tuple(
    getattr(keras.activations, name)
    for name in ("softmax", "log_softmax", "sparsemax", "glu")
    if hasattr(keras.activations, name)
)


def ghost_clipping_support(model: keras.Model) -> str | None:
    """None if ghost clipping is exact for `model`, else why not.

    Exact needs every layer to compute each example from that example alone:
    Sequential or functional models (no `keras.ops` between layers, no
    subclassed model) of `PER_EXAMPLE_LAYERS`, with built-in activations,
    inputs and outputs of rank >= 2 (a batch-only tensor makes any
    last-axis reduction one over the batch), EinsumDense equations that keep
    the batch letter first, and no normalisation, softmax, masking,
    concatenation or attention axis on the batch axis. Inside a wrapper
    (TimeDistributed, Bidirectional, RNN cells, attention), where the batch
    may be merged with other axes, layers that reduce over an axis are
    refused (but MultiHeadAttention's own, whose axes Keras derives).
    """
    for layer in _graph_layers(model):
        if isinstance(layer, keras.Model):
            if not _is_graph_model(layer):
                return (
                    f"model {layer.name!r} ({type(layer).__name__}) is subclassed: "
                    "its call is not known to keep examples apart"
                )
            bare_ops = [
                op.name
                for op in getattr(layer, "operations", [])
                if not isinstance(op, keras.layers.Layer)
            ]
            if bare_ops:
                return (
                    f"functional model {layer.name!r} applies keras.ops outside "
                    f"layers ({bare_ops[:3]}): not known to keep examples apart"
                )
            if any(_call_masks(node) for node in getattr(layer, "_inbound_nodes", [])):
                return (
                    f"model {layer.name!r} is called on a tensor with a Keras "
                    "mask, which its layers read at run time although its own "
                    "graph shows none (unchecked: an attention inside was masked "
                    "over several axes, mixing the examples)"
                )
            continue
        problem = _layer_problem(layer, _input_ranks(layer))
        if problem is None:
            ranks = _input_ranks(layer) | _output_ranks(layer)
            if not ranks:
                problem = "was never called on a Keras input (ranks unknown)"
            elif min(ranks) < 2:
                problem = "has a batch-only (rank 1) input or output"
        if problem is None:
            problem = _inner_problem(layer)
        if problem is not None:
            return f"layer {layer.name!r} ({type(layer).__name__}) {problem}"
    owners = {}
    for unit in weight_units(model):
        for v in unit.trainable_variables:
            owner = owners.setdefault(id(v), unit)
            if owner is not unit:
                return (
                    f"layers {owner.name!r} and {unit.name!r} share the weight "
                    f"{v.path!r} (one layer inside two wrappers?): each would "
                    "clip its own part of that weight's gradient"
                )
    return None


def _graph_layers(model: keras.Model) -> list:
    """`model` and the layers of its graph, through nested graph models."""
    found = [model]
    if _is_graph_model(model):
        for layer in model.layers:
            if isinstance(layer, keras.Model):
                found.extend(_graph_layers(layer))
            elif not isinstance(layer, _L.InputLayer):
                found.append(layer)
    return found


def _inner_problem(layer) -> str | None:
    """Why a sublayer inside `layer` (a wrapper, cell or attention block)
    might mix examples: an unknown layer, a non-built-in activation, or an
    axis whose meaning the batch merged with other axes could change."""
    for inner in all_sublayers(layer):
        problem = _layer_problem(inner, ranks=None)
        if problem is None and (_axes(inner) or _reduces(inner)):
            internal = isinstance(layer, _L.MultiHeadAttention) and all(
                axis > 0 for axis in _axes(inner)
            )
            if not internal:
                problem = "reduces over an axis inside a wrapper"
        if problem is not None:
            return f"contains {inner.name!r} ({type(inner).__name__}), which {problem}"
    return None


def _layer_problem(layer: keras.layers.Layer, ranks: set[int] | None) -> str | None:
    """Why `layer` itself might mix examples (or run unknown code), or None;
    `ranks`: its input ranks (None: axes are checked by `_inner_problem`)."""
    if type(layer) not in PER_EXAMPLE_LAYERS:
        return "is not a Keras layer known to compute each example alone"
    if getattr(layer, "quantization_mode", None) is not None:
        return "is quantized"
    if getattr(layer, "stateful", False):
        return "is stateful (carries state from earlier batches' examples)"
    for name in ("activation", "recurrent_activation"):
        function = getattr(layer, name, None)
        if function is not None and not any(
            function is f for f in _BUILTIN_ACTIVATIONS
        ):
            return f"has a {name} that is not a built-in Keras activation"
    if isinstance(layer, _L.EinsumDense) and _einsum_parts(layer) is None:
        return (
            f"has an equation ({layer.equation!r}, bias_axes "
            f"{getattr(layer, 'bias_axes', None)!r}) whose batch letter is not "
            "first, or is in the kernel or the bias, or whose kernel repeats a "
            "letter or has one absent from the input and output"
        )
    for name in ("dropout", "recurrent_dropout", "_dropout"):
        rate = getattr(layer, name, 0)
        if isinstance(rate, int | float) and rate > 0:
            return (
                f"applies dropout inside the layer ({name.lstrip('_')}={rate}): "
                "its per-layer backward pass would draw other masks than the "
                "forward pass"
            )
    if ranks is None:
        return None
    if isinstance(layer, _L.Attention | _L.MultiHeadAttention):
        return _attention_problem(layer)
    if isinstance(layer, _L.Softmax) and (problem := _softmax_mask_problem(layer)):
        return problem
    for axis in _axes(layer) + ([-1] if _reduces(layer) else []):
        if axis >= 0:
            if axis == 0:
                return "has an axis on the batch (axis 0)"
        elif not ranks:
            return f"has axis {axis}, which cannot be checked (input rank unknown)"
        elif any(axis % rank == 0 or axis < -rank for rank in ranks):
            return f"has axis {axis}, the batch axis (or none) for input ranks {ranks}"
    return None


def _attention_axes_problem(layer, ranks: set[int]) -> str | None:
    """MultiHeadAttention attends over `attention_axes` of its query (rank
    r): each must be a sequence axis, 1 <= axis <= r - 2 once a negative one
    is resolved (Keras wraps out-of-range axes, e.g. -7 to the batch)."""
    axes = layer._attention_axes  # noqa: SLF001 (None: every sequence axis)
    if axes is None:
        return None
    if not ranks:
        return "has attention axes that cannot be checked (query rank unknown)"
    for rank in ranks:
        for axis in axes if isinstance(axes, list | tuple) else [axes]:
            resolved = axis + rank if axis < 0 else axis
            if not 1 <= resolved <= rank - 2:
                return f"has attention axis {axis}, not a sequence axis at rank {rank}"
    return None


def _reduces(layer) -> bool:
    """Whether `layer` reduces over its last axis: Masking (any over the
    features) or a softmax-like activation."""
    if isinstance(layer, _L.Masking):
        return True
    return any(
        getattr(layer, name, None) is f
        for name in ("activation", "recurrent_activation")
        for f in _REDUCING_ACTIVATIONS
    )


def _axes(layer) -> list[int]:
    """The axes a layer normalises, reduces or concatenates over."""
    if isinstance(layer, _L.Dot):
        value = layer.axes
    else:
        value = getattr(layer, "axis", None)
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list | tuple) else [value])]


def _input_ranks(layer) -> set[int]:
    """Ranks of the inputs of each symbolic call of `layer`."""
    return {
        len(t.shape)
        for node in getattr(layer, "_inbound_nodes", [])
        for t in node.input_tensors
    }


def _call_masks(node) -> list:
    """The masks a symbolic call passes: arguments named like a mask (but
    `use_causal_mask`) and the Keras masks its input tensors carry."""
    arguments = getattr(node, "arguments", None)
    masks = []
    if arguments is not None:
        for name, value in arguments.kwargs.items():
            if "mask" in name and name != "use_causal_mask":
                masks.extend(
                    t for t in keras.tree.flatten(value) if hasattr(t, "shape")
                )
    masks.extend(
        t._keras_mask  # noqa: SLF001
        for t in node.input_tensors
        if getattr(t, "_keras_mask", None) is not None
    )
    return masks


def _softmax_mask_problem(layer) -> str | None:
    """A Softmax masked with a mask of another rank than its input: Keras
    broadcasts it, and its batch axis may land on another axis (a review:
    (B, S) against (B, S, T) when B = S = T moved other examples by 0.066)."""
    for node in getattr(layer, "_inbound_nodes", []):
        data = [
            t for t in keras.tree.flatten(node.arguments.args) if hasattr(t, "shape")
        ]
        for mask in _call_masks(node):
            if any(len(mask.shape) != len(t.shape) for t in data):
                return (
                    f"gets a mask of rank {len(mask.shape)} for inputs of rank "
                    f"{sorted({len(t.shape) for t in data})}: broadcast against "
                    "them, its batch axis may land on another axis, masking "
                    "each example with the others' positions"
                )
    return None


def _attention_calls(layer) -> list[tuple[list, list]] | None:
    """Per symbolic call of an attention layer: (the tensors it attends over,
    [(name, mask)] of its masks), its arguments bound to the call's
    parameters, positional or keyword (a review: `inputs=[h, h]` as a
    keyword was missed); Keras masks carried by the tensors count as masks.
    None if a call cannot be bound or attends over no tensor."""
    signature = inspect.signature(layer.call)
    calls = []
    for node in getattr(layer, "_inbound_nodes", []):
        arguments = getattr(node, "arguments", None)
        try:
            bound = signature.bind(*arguments.args, **arguments.kwargs)
        except (AttributeError, TypeError):
            return None
        data, masks = [], []
        for name, value in bound.arguments.items():
            tensors = [t for t in keras.tree.flatten(value) if hasattr(t, "shape")]
            if "mask" in name:
                masks.extend((name, t) for t in tensors)
            else:
                data.extend(tensors)
        if not data:
            return None
        masks.extend(
            ("mask", t._keras_mask)  # noqa: SLF001
            for t in data
            if getattr(t, "_keras_mask", None) is not None
        )
        calls.append((data, masks))
    return calls


def _attention_problem(layer) -> str | None:
    """Why an attention layer might mix examples, or None. Reviews found:
    tensors of rank < 3 (batch x batch scores: 34.9 C for one example); a
    rank-2 call hidden behind a rank-3 one (13.9 C); tensors of different
    ranks (one's batch axis against another's sequence axis); a mask of
    another rank than Keras documents (`attention_mask` 1 + 2 x attention
    axes, the others one less than the tensor they mask), which Keras pads
    so that its batch axis lands on a query axis (3.38 C against the
    replace-one bound of 2 C); MultiHeadAttention masked while attending
    over several axes (padded the same way)."""
    calls = _attention_calls(layer)
    attended = {len(t.shape) for data, _ in calls or [] for t in data}
    if not calls or min(attended) < 3:
        return (
            "attends over the axis before the features, which at query, "
            f"value or key ranks {attended or 'unknown'} is (or may be) the "
            "batch: every example would be mixed into the others (rank >= 3 only)"
        )
    heads = isinstance(layer, _L.MultiHeadAttention)
    for data, masks in calls:
        ranks = sorted({len(t.shape) for t in data})
        if len(ranks) > 1:
            return (
                f"attends over tensors of different ranks {ranks}: broadcast "
                "together, one's batch axis may meet another's sequence axis"
            )
        axes = layer._attention_axes if heads else None  # noqa: SLF001
        count = len(axes) if axes is not None else ranks[0] - 2
        if heads and masks and count > 1:
            return (
                f"is masked while attending over {count} axes: Keras pads "
                "such masks so that their batch axis lands on a query axis"
            )
        for name, mask in masks:
            allowed = 1 + 2 * count if name == "attention_mask" else ranks[0] - 1
            if len(mask.shape) != allowed:
                return (
                    f"gets a {name} of rank {len(mask.shape)} (expected "
                    f"[{allowed}]): Keras pads it with axes, and its batch axis "
                    "may land on a query axis, mixing the examples"
                )
    return _attention_axes_problem(layer, attended) if heads else None


def _output_ranks(layer) -> set[int]:
    """Ranks of the outputs of each symbolic call of `layer`."""
    return {
        len(t.shape)
        for node in getattr(layer, "_inbound_nodes", [])
        for t in node.output_tensors
    }


def _is_graph_model(model: keras.Model) -> bool:
    from keras.src.models.functional import Functional

    return isinstance(model, keras.Sequential | Functional)


def weight_units(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers whose calls are recorded: the layers of `model`, through
    nested Sequential/functional models, that own trainable weights."""
    units = []
    for layer in model.layers:
        found = weight_units(layer) if _is_graph_model(layer) else [layer]
        for unit in found:
            # a layer shared with a nested model is one unit
            if unit.trainable_variables and all(unit is not u for u in units):
                units.append(unit)
    return units


# ------------------------------------------------------------- recording
@dataclass
class _Call:
    """One call of a unit: its arguments, its outputs (flattened) and, for a
    layer with an activation, the pre-activation output."""

    args: tuple
    kwargs: dict
    outputs: list = field(default_factory=list)
    pre_activation: tf.Tensor | None = None
    masks: list = field(default_factory=list)


@dataclass
class _Unit:
    layer: keras.layers.Layer
    fast: bool
    calls: list[_Call] = field(default_factory=list)


def uses_fast_rule(layer: keras.layers.Layer) -> bool:
    """Whether ghost clipping computes `layer` by its direct (input, output
    gradient) rule when it is called once per step; otherwise by a
    vectorised backward pass through that layer alone."""
    if type(layer) not in FAST_LAYERS or getattr(layer, "lora_enabled", False):
        return False
    if isinstance(layer, keras.layers.EinsumDense):
        return _einsum_parts(layer) is not None
    if isinstance(layer, keras.layers.Conv1D | keras.layers.Conv2D):
        return (
            layer.groups == 1
            and layer.data_format == "channels_last"
            and layer.padding in ("valid", "same")
        )
    return True


_ABSENT = object()


class _Recorder:
    """While active, each unit's `call` records its arguments and its
    pre-activation output (the output of Embedding and of generic units)."""

    def __init__(self, units: Sequence[_Unit]):
        self.units = units
        self._saved: list[tuple[keras.layers.Layer, str, object]] = []

    def __enter__(self):
        for unit in self.units:
            self._replace(unit.layer, "call", self._recording_call(unit))
            if unit.fast and hasattr(unit.layer, "activation"):
                self._replace(
                    unit.layer, "activation", self._recording_activation(unit)
                )
        return self

    def _replace(self, layer, name: str, value) -> None:
        """Set an instance attribute, bypassing Keras's tracking, and keep
        what to restore (the instance's own value, or none)."""
        self._saved.append((layer, name, vars(layer).get(name, _ABSENT)))
        object.__setattr__(layer, name, value)

    def __exit__(self, *exc):
        for layer, name, value in reversed(self._saved):
            if value is _ABSENT:
                object.__delattr__(layer, name)
            else:
                object.__setattr__(layer, name, value)
        self._saved.clear()

    @staticmethod
    def _recording_call(unit: _Unit) -> Callable:
        original = type(unit.layer).call.__get__(unit.layer)

        def call(*args, **kwargs):
            # Keras masks carried by the arguments, per flattened leaf, taken
            # before the call (MultiHeadAttention reads its query's and then
            # removes it: the per-layer pass lost it, a review measured sums
            # 0.13-1.76 off the one-example loop)
            masks = [_keras_mask(leaf) for leaf in tf.nest.flatten((args, kwargs))]
            record = _Call(args, kwargs, masks=masks)
            unit.calls.append(record)
            outputs = original(*args, **kwargs)
            record.outputs = tf.nest.flatten(outputs)
            return outputs

        return call

    @staticmethod
    def _recording_activation(unit: _Unit) -> Callable:
        activation = unit.layer.activation

        def record(z):
            unit.calls[-1].pre_activation = z
            return activation(z) if activation is not None else z

        return record


# --------------------------------------------------------- per-layer rules
def _rows(a: tf.Tensor, delta: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(batch, T, d) views of an input and an output gradient; T is static
    when the inner dimensions are (with an unknown batch dimension, a -1
    would leave it unknown, and T = 1 could not take its fast rule)."""
    batch = tf.shape(a)[0]
    inner = a.shape[1:-1]
    rows = math.prod(inner) if None not in inner else -1
    return (
        tf.reshape(a, [batch, rows, a.shape[-1]]),
        tf.reshape(delta, [batch, rows, delta.shape[-1]]),
    )


def _linear(a: tf.Tensor, delta: tf.Tensor, shape) -> tuple[tf.Tensor, Callable]:
    """Per-example squared norms of ``A_i^T Delta_i`` for (batch, T, d_in) and
    (batch, T, d_out) rows, and the clipped sum (reshaped to the kernel's
    `shape`) as a function of (c, kept).

    T = 1: ``||a_i||^2 ||delta_i||^2``, and the sum is one matmul over the
    batch (each entry of an example's gradient is a single product, so the
    sum adds exactly the vectors whose norms were taken). T > 1: the
    per-example kernels are materialised and the clipped sum contracts
    THEM. The Gram form ``<A_i A_i^T, Delta_i Delta_i^T>`` is not used: when
    an example's rows cancel, float32 rounding of its large terms gave
    norms far below the norm of what was summed (a review found
    contributions of 166 C).
    """
    if a.shape[1] == 1:
        a, delta = a[:, 0], delta[:, 0]
        a_scale, delta_scale = _row_scale(a), _row_scale(delta)
        a, delta = a / a_scale[:, None], delta / delta_scale[:, None]
        norms = tf.square(
            a_scale
            * tf.sqrt(example_squares(a))
            * delta_scale
            * tf.sqrt(example_squares(delta))
        )

        def outer_sum(c, kept):
            # Rows scaled to a largest entry of 1 and c * scales <= C: no
            # factor under- or overflows (c * delta of a huge input and a tiny
            # gradient flushed to zero: a review found 0.79 C for 1 C).
            factor = c * a_scale * delta_scale  # NaN for a dropped inf row
            weighted = _keep(delta * factor[:, None], kept)
            return tf.reshape(
                tf.matmul(_keep(a, kept), weighted, transpose_a=True), shape
            )

        return norms, outer_sum
    norms, summed = _materialised(tf.einsum("bti,bto->bio", a, delta))
    return norms, lambda c, kept: tf.reshape(summed(c, kept), shape)


def _row_scale(rows: tf.Tensor) -> tf.Tensor:
    """max|x| of each row of (batch, d) (1 for a zero row). Norms are taken
    as max|x| * ||x / max|x|||: the squares of huge or tiny entries would
    overflow or flush to zero, while the products a_k delta_o the clipped
    sum adds stay finite (a review found an input of 1e19 with gradients of
    1e-19 given norm 0)."""
    scale = tf.reduce_max(tf.abs(rows), axis=1)
    return tf.where(scale > 0, scale, tf.ones_like(scale))


def _materialised(per_example: tf.Tensor):
    """Squared norms (batch,) of per-example gradients (batch, *shape), and
    their clipped sum as a function of (c, kept)."""
    norms = example_squares(per_example)
    return norms, lambda c, kept: _weighted_sum(c, per_example, kept)


def _weighted_sum(c: tf.Tensor, per_example: tf.Tensor, kept: tf.Tensor):
    """``sum_i c_i per_example_i``. A kept example's norm is finite, so its
    entries are; a dropped one has c_i = 0, and its rows are zeroed first
    (`_keep`: 0 * inf is NaN) only when the plain sum shows a non-finite
    entry."""
    plain = tf.tensordot(c, per_example, axes=1)
    return tf.cond(
        tf.reduce_all(tf.math.is_finite(plain)),
        lambda: plain,
        lambda: tf.tensordot(c, _keep(per_example, kept), axes=1),
    )


def _keep(rows: tf.Tensor, kept: tf.Tensor) -> tf.Tensor:
    """`rows` (batch, ...) with the rows of dropped examples zeroed (by
    value: 0 * inf would be NaN in a contraction over the batch)."""
    mask = tf.reshape(kept, [-1] + [1] * (rows.shape.rank - 1))
    return tf.where(mask, rows, tf.zeros_like(rows))


def _reduce_to(delta: tf.Tensor, shape: tuple[int, ...]) -> tf.Tensor:
    """(batch, *shape): delta summed over the axes a tensor of `shape`
    broadcasts over (the leading ones and those of size 1)."""
    rank = delta.shape.rank - 1
    lead = list(range(1, rank - len(shape) + 1))
    if lead:
        delta = tf.reduce_sum(delta, axis=lead)
    ones = [i + 1 for i, size in enumerate(shape) if size == 1]
    if ones:
        delta = tf.reduce_sum(delta, axis=ones, keepdims=True)
    return delta


def _conv(layer, a: tf.Tensor, delta: tf.Tensor) -> tuple[tf.Tensor, Callable]:
    """A Conv1D/2D is a dense layer on its input patches: T = out_h * out_w
    rows of kh * kw * c_in values (`_conv_patches`). The per-example kernels
    are materialised slice group by slice group (no patch tensor); norms and
    the clipped sum are taken group by group, and only the summed kernel is
    put in kernel order (see `_linear` on the Gram form)."""
    groups, order = _conv_patches(layer, a)
    if isinstance(layer, keras.layers.Conv1D):
        delta = delta[:, None]
    parts, taps, start = [], [], 0
    for group in groups:
        group_order = order[start : start + group.shape[-1]]
        start += group.shape[-1]
        per_example = tf.matmul(*_rows(group, delta), transpose_a=True)
        valid = [m for m, tap in enumerate(group_order) if tap >= 0]
        if len(valid) < len(group_order):  # phases past the kernel's edge
            per_example = tf.gather(per_example, valid, axis=1)
        parts.append(_materialised(per_example))
        taps.extend(group_order[m] for m in valid)
    norms = tf.add_n([part_norms for part_norms, _ in parts])
    position = {tap: m for m, tap in enumerate(taps)}
    in_kernel_order = [position[tap] for tap in range(len(taps))]
    kernel = layer.kernel.shape

    def kernel_sum(c, kept):
        summed = tf.concat([part_sum(c, kept) for _, part_sum in parts], 0)
        return tf.reshape(tf.gather(summed, in_kernel_order), kernel)

    return norms, kernel_sum


def _conv_patches(layer, a: tf.Tensor) -> tuple[list[tf.Tensor], list[int]]:
    """Input patches of a Conv1D/2D as slice groups (batch, out_h, out_w, k)
    whose channels, concatenated, hold the kernel's flattened (kh, kw, c_in)
    entries `order` (-1: a phase past the kernel's edge, to be dropped).
    Contiguous slices (strided slices and `tf.image.extract_patches` are
    several times slower on CPU): with stride 1, one slice per tap; with
    stride s, the padded input is cut into its s x s phases (space to depth)
    and one slice holds the s x s taps of a group."""
    if isinstance(layer, keras.layers.Conv1D):
        a = a[:, None]
        sizes, strides, rates = (
            (1, *layer.kernel_size),
            (1, *layer.strides),
            (1, *layer.dilation_rate),
        )
    else:
        sizes, strides, rates = layer.kernel_size, layer.strides, layer.dilation_rate
    channels = a.shape[-1]
    pads, outs = [[0, 0]], []
    for n, k, stride, rate in zip(a.shape[1:3], sizes, strides, rates, strict=True):
        span = (k - 1) * rate + 1
        if layer.padding == "same":
            out = -(-n // stride)
            total = max((out - 1) * stride + span - n, 0)
            before = total // 2
        else:
            out, before = (n - span) // stride + 1, 0
        # a whole number of strides covering every tap: zeros after, or
        # the rows no output uses cropped
        blocks = out - 1 + -(-span // stride)
        pads.append([before, blocks * stride - n - before])
        outs.append(out)
    a = tf.pad(a, [[low, max(high, 0)] for low, high in pads] + [[0, 0]])
    a = a[:, : a.shape[1] + min(pads[1][1], 0), : a.shape[2] + min(pads[2][1], 0)]
    (out_h, out_w), (kh, kw) = outs, sizes

    def index(i, j, c):
        return (i * kw + j) * channels + c if i < kh and j < kw else -1

    if tuple(strides) == (1, 1):
        rh, rw = rates
        taps = [
            a[:, i * rh : i * rh + out_h, j * rw : j * rw + out_w]
            for i in range(kh)
            for j in range(kw)
        ]
        return taps, list(range(kh * kw * channels))
    sh, sw = strides
    batch = tf.shape(a)[0]
    phases = tf.reshape(
        a, [batch, a.shape[1] // sh, sh, a.shape[2] // sw, sw, channels]
    )
    phases = tf.reshape(
        tf.transpose(phases, [0, 1, 3, 2, 4, 5]),
        [batch, a.shape[1] // sh, a.shape[2] // sw, sh * sw * channels],
    )
    groups, order = [], []
    for p in range(-(-kh // sh)):
        for q in range(-(-kw // sw)):
            groups.append(phases[:, p : p + out_h, q : q + out_w])
            order.extend(
                index(p * sh + u, q * sw + v, c)
                for u in range(sh)
                for v in range(sw)
                for c in range(channels)
            )
    return groups, order


def _einsum_parts(layer) -> tuple[str, str, str] | None:
    """(input, kernel, output) subscripts of an EinsumDense whose first input
    and output letter is the batch axis, absent from the kernel and the bias,
    and whose kernel letters are distinct and all appear in the input or
    output; None otherwise."""
    equation = layer.equation.replace(" ", "")
    if "..." in equation or "->" not in equation:
        return None
    inputs, output = equation.split("->")
    parts = inputs.split(",")
    if len(parts) != 2:
        return None
    a, kernel = parts
    if not a or not output or a[0] != output[0] or a[0] in kernel:
        return None
    if len(set(kernel)) < len(kernel):  # a diagonal of the kernel
        return None
    if any(letter not in a + output for letter in kernel):
        return None
    if a[0] in (getattr(layer, "bias_axes", None) or ""):  # a bias per example
        return None
    return a, kernel, output


def _fast_unit(unit: _Unit, delta: tf.Tensor) -> tuple[tf.Tensor, Callable]:
    """Per-example squared norms of the unit's weight gradients (batch,), and
    a function of (c, kept) giving the clipped sums, in `_fast_variables`
    order."""
    layer = unit.layer
    (call,) = unit.calls
    a = _input_of(call)
    if isinstance(layer, keras.layers.Embedding):
        return _embedding(layer, a, delta)
    if isinstance(layer, keras.layers.EinsumDense):
        a_spec, kernel_spec, out_spec = _einsum_parts(layer)
        batch = a_spec[0]
        norms, kernel_sum = _materialised(
            tf.einsum(f"{a_spec},{out_spec}->{batch}{kernel_spec}", a, delta)
        )
    elif isinstance(layer, keras.layers.Conv1D | keras.layers.Conv2D):
        norms, kernel_sum = _conv(layer, a, delta)
    else:
        norms, kernel_sum = _linear(*_rows(a, delta), layer.kernel.shape)

    bias = getattr(layer, "bias", None)
    if bias is None:
        return norms, lambda c, kept: [kernel_sum(c, kept)]
    bias_norms, bias_sum = _materialised(_reduce_to(delta, tuple(bias.shape)))
    return norms + bias_norms, lambda c, kept: [
        kernel_sum(c, kept),
        bias_sum(c, kept),
    ]


def _embedding(layer, ids: tf.Tensor, delta: tf.Tensor):
    """Example i's gradient of the table row of id k is the sum of its output
    gradients at the positions holding k: ``R_it = sum_t' [id_t = id_t']
    delta_it'`` (a T x T match matrix times the output gradients). Each row
    is measured and added once, at the first position holding its id: the
    clipped sum adds exactly the rows whose norms were taken (no
    cancellation-prone Gram terms, no repeated partial copies)."""
    batch = tf.shape(delta)[0]
    ids = tf.reshape(tf.cast(ids, tf.int32), [batch, -1])
    # Keras's take reads a negative id from the end of the table (-1: the
    # last row), so the rule does too (a review: -1 measured apart from the
    # last row, and then dropped from the sum: norms off by up to 25%)
    ids = tf.where(ids < 0, ids + layer.input_dim, ids)
    rows = tf.reshape(delta, [batch, -1, delta.shape[-1]])
    if ids.shape[1] == 1:
        first_rows = rows
    else:
        same = tf.equal(ids[:, :, None], ids[:, None, :])
        length = tf.shape(ids)[1]
        earlier = tf.range(length)[None, :] < tf.range(length)[:, None]
        first = ~tf.reduce_any(same & earlier[None], axis=2)  # (batch, T)
        summed_rows = tf.matmul(tf.cast(same, rows.dtype), rows)
        first_rows = tf.where(first[:, :, None], summed_rows, tf.zeros_like(rows))
    norms = example_squares(first_rows)

    def sums(c, kept):
        weighted = _keep(first_rows, kept) * c[:, None, None]
        return [
            tf.math.unsorted_segment_sum(
                tf.reshape(weighted, [-1, rows.shape[-1]]),
                tf.reshape(ids, [-1]),
                layer.input_dim,
            )
        ]

    return norms, sums


def _keras_mask(value) -> tf.Tensor | None:
    """The Keras mask a tensor carries, or None."""
    return getattr(value, "_keras_mask", None) if tf.is_tensor(value) else None


def _generic_unit(unit: _Unit, deltas: list[list[tf.Tensor]]):
    """Per-example gradients of the unit's own weights by a vectorised
    backward pass through this layer alone: for each example, the output
    gradient delta_i pulled back through its call on that example's inputs
    (summed over the unit's calls)."""
    layer = unit.layer
    variables = layer.trainable_variables
    flat_inputs, rebuilders = [], []
    for call, call_deltas in zip(unit.calls, deltas, strict=True):
        structure = (call.args, call.kwargs)
        leaves = tf.nest.flatten(structure)
        tensor_at = [i for i, leaf in enumerate(leaves) if tf.is_tensor(leaf)]
        masked_at = [i for i in tensor_at if call.masks[i] is not None]
        flat_inputs.append(
            (
                [leaves[i] for i in tensor_at],
                [call.masks[i] for i in masked_at],
                call_deltas,
            )
        )
        rebuilders.append((structure, leaves, tensor_at, masked_at))

    original = type(layer).call.__get__(layer)

    def one_example(elements):
        with tf.GradientTape() as tape:
            outputs, grads = [], []
            for (tensors, masks, call_deltas), rebuild in zip(
                elements, rebuilders, strict=True
            ):
                structure, leaves, tensor_at, masked_at = rebuild
                leaves = list(leaves)
                for i, t in zip(tensor_at, tensors, strict=True):
                    leaves[i] = t[None]
                for i, mask in zip(masked_at, masks, strict=True):
                    leaves[i]._keras_mask = mask[None]  # noqa: SLF001
                args, kwargs = tf.nest.pack_sequence_as(structure, leaves)
                outputs.extend(tf.nest.flatten(original(*args, **kwargs)))
                grads.extend(d[None] for d in call_deltas)
        return tape.gradient(
            outputs,
            variables,
            output_gradients=grads,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )

    per_example = per_example_map(one_example, flat_inputs, "ghost clipping")
    parts = [_materialised(g) for g in per_example]
    return tf.add_n([norms for norms, _ in parts]), lambda c, kept: [
        summed(c, kept) for _, summed in parts
    ]


# ------------------------------------------------------------------ entry
@dataclass
class ClippedSum:
    """One step of ghost clipping.

    Attributes:
        gradients: per trainable variable of the model, ``sum_i c_i g_i``.
        norms: (batch,) each example's gradient norm before clipping
            (over all variables; inf or NaN for a dropped example).
        losses: (batch,) the per-example losses (unweighted).
        predictions: the model's outputs.
    """

    gradients: list[tf.Tensor]
    norms: tf.Tensor
    losses: tf.Tensor
    predictions: tf.Tensor


def clipped_gradient_sum(
    model: keras.Model,
    x: tf.Tensor,
    y: tf.Tensor,
    per_example_losses: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
    weights: tf.Tensor,
    l2_norm_clip: float,
    margin: float = 1.0,
) -> ClippedSum:
    """``sum_i w_i min(1, C / ||g_i||) g_i`` over the batch, per trainable
    variable, from one batched forward and one backward pass to the layer
    outputs.

    Args:
        model: a network `ghost_clipping_support` accepts.
        x: the batch's inputs (batch, ...); y: its labels.
        per_example_losses: (y, y_pred) -> (batch,) unreduced losses.
        weights: (batch,) sample weights; taken in [0, 1] (a larger weight
            would exceed C: values are clipped into [0, 1], NaN counts 0).
        l2_norm_clip: C.
        margin: the clip aims at ``C * margin`` (a margin below 1 absorbs
            the float32 rounding between the norm computed here and the norm
            of the vector summed).

    Raises:
        ValueError: a network ghost clipping does not support.
    """
    turn_off_tensor_float_32("clipped_gradient_sum")  # its sums are matmuls
    reason = ghost_clipping_support(model)
    if reason is not None:
        raise ValueError(f"Ghost clipping is not exact for this network: {reason}.")
    units = [_Unit(layer, uses_fast_rule(layer)) for layer in weight_units(model)]
    with tf.GradientTape() as tape:
        with _Recorder(units):
            predictions = model(x, training=True)
        losses = per_example_losses(y, predictions)
        total = tf.reduce_sum(losses)
    # The fast rules need the gradient at the pre-activation output (the
    # output itself for Embedding); the per-layer pass, at the outputs.
    targets = [
        [call.outputs[0] if call.pre_activation is None else call.pre_activation]
        if _uses_fast_rule(unit)
        else call.outputs
        for unit in units
        for call in unit.calls
    ]
    deltas = tape.gradient(
        total, targets, unconnected_gradients=tf.UnconnectedGradients.ZERO
    )
    per_unit, start = [], 0
    for unit in units:
        unit_deltas = deltas[start : start + len(unit.calls)]
        start += len(unit.calls)
        if not unit.calls:
            per_unit.append(None)
        elif _uses_fast_rule(unit):
            per_unit.append(_fast_unit(unit, unit_deltas[0][0]))
        else:
            per_unit.append(_generic_unit(unit, unit_deltas))
    squares = [norms for norms, _ in filter(None, per_unit)]
    batch = tf.shape(losses)[0]
    norms = tf.sqrt(tf.add_n(squares)) if squares else tf.zeros([batch])
    kept = tf.math.is_finite(norms) & tf.math.is_finite(losses)
    limit = float(l2_norm_clip) * margin
    scale = tf.minimum(1.0, limit / tf.maximum(tf.where(kept, norms, 1.0), 1e-30))
    weights = tf.cast(weights, scale.dtype)
    weights = tf.where(tf.math.is_finite(weights), tf.clip_by_value(weights, 0, 1), 0)
    coefficients = tf.where(kept, scale * weights, 0.0)
    if squares:
        # One coefficient per example of the inputs' batch: labels or weights
        # that outnumber the inputs broadcast above (a malformed batch the
        # train step's guards refuse or zero); each input row is counted once.
        examples = tf.shape(norms)[0]
        kept, coefficients = kept[:examples], coefficients[:examples]
    by_variable = {}
    for unit, result in zip(units, per_unit, strict=True):
        if result is None:  # never called: no gradient
            continue
        variables = (
            _fast_variables(unit.layer)
            if _uses_fast_rule(unit)
            else unit.layer.trainable_variables
        )
        for v, summed in zip(variables, result[1](coefficients, kept), strict=True):
            by_variable[id(v)] = summed
    gradients = [
        by_variable.get(id(v), tf.zeros_like(v)) for v in model.trainable_variables
    ]
    return ClippedSum(gradients, norms, losses, predictions)


def _uses_fast_rule(unit: _Unit) -> bool:
    """A fast layer called once, on an input whose shape the rule needs
    (a convolution's spatial size) known when traced."""
    if not unit.fast or len(unit.calls) != 1:
        return False
    if isinstance(unit.layer, keras.layers.Conv1D | keras.layers.Conv2D):
        return None not in _input_of(unit.calls[0]).shape[1:-1]
    return True


def _input_of(call: _Call) -> tf.Tensor:
    """The layer input of a recorded call (first argument, or `inputs=`)."""
    return call.args[0] if call.args else call.kwargs["inputs"]


def _fast_variables(layer) -> list:
    """The variables a fast rule returns sums for, in its order."""
    if isinstance(layer, keras.layers.Embedding):
        return [layer.embeddings]
    bias = getattr(layer, "bias", None)
    return [layer.kernel] if bias is None else [layer.kernel, bias]


__all__ = [
    "FAST_LAYERS",
    "ClippedSum",
    "clipped_gradient_sum",
    "ghost_clipping_support",
    "uses_fast_rule",
    "weight_units",
]

"""Small Keras helpers shared by the core and the ports."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import keras
import tensorflow as tf


def nested_layers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """Every layer nested in ``layer`` (its sub-models' layers too), depth first."""
    found = []
    for sub in getattr(layer, "layers", []):
        found.append(sub)
        found.extend(nested_layers(sub))
    return found


def all_sublayers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """Every layer tracked anywhere inside `layer` (custom layers' attributes
    and wrappers such as TimeDistributed included), through Keras's own walk
    (`Layer._flatten_layers`, private API of Keras 3)."""
    return layer._flatten_layers(include_self=False, recursive=True)  # noqa: SLF001


def pop_keras_objects(
    config: dict, keys: tuple[str, ...], custom_objects=None
) -> tuple[dict, list]:
    """Split a wrapper's saved config: (the config without `keys`, the Keras
    objects (models, layers) saved under them, deserialised, in order)."""
    config = dict(config)
    objects = [
        keras.saving.deserialize_keras_object(
            config.pop(key), custom_objects=custom_objects
        )
        for key in keys
    ]
    return config, objects


def tensor_float_32_possible() -> bool:
    """Whether float32 matmuls and convolutions may run in TensorFloat-32
    here (10 mantissa bits; TensorFlow enables it by default on Ampere and
    later GPUs)."""
    return bool(
        tf.config.experimental.tensor_float_32_execution_enabled()
        and tf.config.list_logical_devices("GPU")
    )


def turn_off_tensor_float_32(owner: str) -> None:
    """Turn TensorFloat-32 off for the process where it could round float32
    matmuls and convolutions (with a warning): the gradient bounds and the
    clipping margins hold for float32 rounding, not for 10-bit mantissas
    (an emulation gave clipped contributions of 1.0005 C)."""
    if not tensor_float_32_possible():
        return
    tf.config.experimental.enable_tensor_float_32_execution(False)
    warnings.warn(
        f"{owner}: TensorFloat-32 execution turned off for this process "
        "(tf.config.experimental.enable_tensor_float_32_execution(False)): its "
        "rounding of float32 matmuls and convolutions is not covered by the "
        "gradient bounds.",
        stacklevel=3,
    )


#: TensorFlow's batched matrix products
_BATCH_MATMULS = ("BatchMatMul", "BatchMatMulV2", "BatchMatMulV3")


def onednn_enabled() -> bool:
    """Whether TensorFlow runs its oneDNN CPU kernels (decided when TensorFlow
    is imported: `TF_ENABLE_ONEDNN_OPTS`); True when it cannot be told."""
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:  # pragma: no cover (a TensorFlow without the probe)
        return True
    return bool(_pywrap_util_port.IsMklEnabled())


def _called_functions(op) -> list[str]:
    """Names of the functions `op` calls (while bodies, tf.function calls)."""
    names = []
    for value in op.node_def.attr.values():
        if value.HasField("func"):
            names.append(value.func.name)
        elif value.HasField("list"):
            names.extend(f.name for f in value.list.func)
    return names


def _function_graph(graph, name: str):
    """The graph of function `name` as `graph` or a graph around it holds it,
    or None."""
    while graph is not None:
        function = getattr(graph, "_functions", {}).get(name)
        if function is not None:
            return getattr(function, "graph", None)
        graph = getattr(graph, "outer_graph", None)
    return None


def _broadcasts_at_rank_4(op) -> bool:
    """A batched product (or an einsum) whose operands' batch axes broadcast
    at rank >= 4, or whose ranks are unknown."""
    x, y = (tensor.shape for tensor in op.inputs[:2])
    if x.rank is None or y.rank is None:
        return True
    if max(x.rank, y.rank) < 4:
        return False
    if op.type == "Einsum":
        return x.rank != y.rank or b"..." in op.get_attr("equation")
    pairs = zip(x[:-2], y[:-2], strict=False)
    return x.rank != y.rank or any((a == 1) != (b == 1) for a, b in pairs)


def broadcast_batch_matmuls(operations) -> list[str]:
    """Names of the batched matrix products among `operations`, and in the
    functions they call, whose batch axes broadcast at rank >= 4:
    TensorFlow 2.21's oneDNN kernel returns wrong values there, and corrupts
    memory, e.g. for a (4, 1, 5, 8) by (8, 3) product (measured on this
    project's CPU: 1e18 off, then a crash). `tf.vectorized_map` writes
    exactly that for a per-example (1, M, K) by (K, N) product
    (MultiHeadAttention's projections, EinsumDense), and an Einsum of
    operands of different ranks (an ellipsis) runs one inside. A function
    whose graph cannot be read counts as one."""
    found, seen, stack = [], set(), list(operations)
    while stack:
        op = stack.pop()
        if op.type in (*_BATCH_MATMULS, "Einsum") and _broadcasts_at_rank_4(op):
            found.append(op.name)
        for name in _called_functions(op):
            if name in seen:
                continue
            seen.add(name)
            graph = _function_graph(op.graph, name)
            if graph is None:
                found.append(f"{name} (a function whose graph cannot be read)")
            else:
                stack.extend(graph.get_operations())
    return found


def _traced_apart(build: Callable, elems):
    """`build(elems)` traced in a graph of its own: its products can be read
    before anything of it is built here, and it is built only by calling it
    (a vectorised graph's ops that were built but not used may still run,
    and corrupt memory)."""
    specs = tf.nest.map_structure(tf.TensorSpec.from_tensor, elems)
    return tf.function(build).get_concrete_function(specs)


def per_example_map(fn: Callable, elems, owner: str):
    """``tf.vectorized_map(fn, elems)``, or, where the vectorised graph holds a
    product that oneDNN computes wrongly (`broadcast_batch_matmuls`), the
    same per-example `fn` in a loop (`tf.map_fn`: each example's own shapes),
    with a warning: per-example gradients must be each example's own. Each
    candidate is traced once, apart, and read; only the chosen one is called.

    Returns:
        `fn`'s outputs stacked over the examples (axis 0).

    Raises:
        ValueError: each example's own pass computes such a product.
    """
    if tf.executing_eagerly():
        return tf.function(lambda e: per_example_map(fn, e, owner))(elems)
    if not onednn_enabled():
        return tf.vectorized_map(fn, elems)
    vectorised = _traced_apart(lambda e: tf.vectorized_map(fn, e), elems)
    wrong = broadcast_batch_matmuls(vectorised.graph.get_operations())
    if not wrong:
        return vectorised(elems)
    warnings.warn(
        f"{owner}: TensorFlow's oneDNN kernel computes batched matrix products "
        f"with broadcast batch axes wrongly ({wrong[0]}), and the vectorised "
        "per-example pass of this model needs them: its examples run in a "
        "loop instead (slower). Set TF_ENABLE_ONEDNN_OPTS=0 before importing "
        "TensorFlow to keep them vectorised.",
        RuntimeWarning,
        stacklevel=3,
    )
    signature = tf.nest.map_structure(
        lambda t: tf.TensorSpec(t.shape[1:], t.dtype), vectorised.structured_outputs
    )
    looped = _traced_apart(
        lambda e: tf.map_fn(fn, e, fn_output_signature=signature), elems
    )
    wrong = broadcast_batch_matmuls(looped.graph.get_operations())
    if wrong:
        raise ValueError(
            f"{owner}: each example's own pass of this model computes a batched "
            "matrix product with broadcast batch axes, which TensorFlow's oneDNN "
            f"kernel computes wrongly ({wrong[0]}): per-example gradients would "
            "not be each example's own. Set TF_ENABLE_ONEDNN_OPTS=0 before "
            "importing TensorFlow, or give the layers static shapes."
        )
    return looped(elems)

"""DP training under `tf.distribute`: which strategies, and the replica rules.

Under `MirroredStrategy` and `MultiWorkerMirroredStrategy` the train step runs
once per replica on that replica's share of the global batch, and the Keras
optimizer SUMS the replicas' gradients (an all-reduce) before applying them to
every copy of the weights. The DP step keeps the single-device mechanism
exactly (docs/distributed.md):

- each replica computes the sum of its samples' bounded gradients;
- the noise is drawn ONCE per global step, by the first replica only, with
  the full planned std sigma * S; the other replicas add nothing. The
  all-reduced update is then (sum over the global batch + one Gaussian) / B,
  with B the GLOBAL expected batch size: the mechanism the accountant
  describes. (Noise in every replica would be summed R times: over-noised
  with a shared seed, under-noised if "fixed" by std / R with independent
  streams.)
- S is the largest of the replicas' sensitivities (gathered by an
  all-reduce): every copy of the weights is updated identically, but should
  two copies ever drift by rounding, no replica's samples exceed the noise's
  sensitivity.
- unless the optimizer only sums the replicas' gradients (a stock Keras
  optimizer without clipping: `sums_replica_gradients`), the noisy sums are
  all-reduced in the DP step and every replica hands the optimizer 1/R of
  the released update (`released_on_every_replica`): what the optimizer
  does to each replica's gradient before its own sum (a `clipnorm`) is then
  post-processing of the released update.
- the DP train step runs only inside Keras's train function (fit,
  train_on_batch), which gives each replica its own share of the batch:
  `strategy.run(model.train_step, args=(batch,))` would give every replica
  the whole batch.

Strategies whose variables are not mirrored on every replica (TPU,
parameter-server, central storage) are refused with a clear error.
"""

from __future__ import annotations

import json
import socket
import weakref

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.distribute import distribute_lib

from ._validation import require_one_of
from .accounting import steps_per_epoch
from .data import (
    POISSON_PADDINGS,
    SamplingProvenance,
    _with_provenance,
    bucket_padding,
    poisson_batches,
    public_nb_samples,
)

#: The strategies a DP model trains under (the default one: no strategy).
SUPPORTED_STRATEGIES = (
    type(distribute_lib._get_default_strategy()),
    tf.distribute.OneDeviceStrategy,
    tf.distribute.MirroredStrategy,
    tf.distribute.MultiWorkerMirroredStrategy,
)


#: Strategy methods that decide which replica gets which samples: a DP model
#: refuses a strategy with one of them replaced on the instance.
_TRUSTED_METHODS = (
    "experimental_distribute_dataset",
    "distribute_datasets_from_function",
    "run",
)
#: Marks this package's own wrapper of `experimental_distribute_dataset`.
_OURS = "_dp_marks_splitting"


def distribute_and_mark(strategy: tf.distribute.Strategy) -> object:
    """A replacement for `strategy.experimental_distribute_dataset` (set on
    the instance while a DP model's `fit` or `train_on_batch` runs): the
    class's own method (a supported strategy's), its result marked
    (`mark_splitting`)."""

    def distribute(*args, **kwargs):
        method = type(strategy).experimental_distribute_dataset
        return mark_splitting(method(strategy, *args, **kwargs))

    setattr(distribute, _OURS, True)
    return distribute


def check_strategy(owner: str, strategy: tf.distribute.Strategy | None = None) -> None:
    """Refuse a strategy the DP train step does not support.

    Args:
        owner: the refusing class's name, for the message.
        strategy: the model's strategy (default: the one in scope).

    Raises:
        NotImplementedError: naming the strategy when its class is not one
            of `SUPPORTED_STRATEGIES` (a subclass neither), or when one of
            its methods that split the data is replaced on the instance.
    """
    strategy = strategy or tf.distribute.get_strategy()
    overridden = [
        name
        for name in _TRUSTED_METHODS
        if name in vars(strategy) and not getattr(vars(strategy)[name], _OURS, False)
    ]
    if overridden:
        raise NotImplementedError(
            f"{owner} does not support a {type(strategy).__name__} whose "
            f"{overridden[0]} is replaced on the instance: it decides which "
            "replica gets which samples."
        )
    if type(strategy) in SUPPORTED_STRATEGIES:
        return
    names = ", ".join(cls.__name__ for cls in SUPPORTED_STRATEGIES[1:])
    if isinstance(strategy, SUPPORTED_STRATEGIES):
        raise NotImplementedError(
            f"{owner} does not support {type(strategy).__name__}, a subclass of "
            f"a supported strategy: it can change how batches are split over "
            f"the replicas. Supported: no strategy, {names}."
        )
    raise NotImplementedError(
        f"{owner} does not support {type(strategy).__name__}: its variables are "
        "not mirrored on every replica, so the once-per-step noise and the "
        "bounds read from the synchronised weights would not describe what "
        f"runs. Supported: no strategy, {names}."
    )


def num_replicas() -> int:
    """R: the replicas that train together (1 without a strategy)."""
    return int(tf.distribute.get_strategy().num_replicas_in_sync)


def num_workers(strategy: tf.distribute.Strategy | None = None) -> int:
    """The worker processes of `strategy` (default: the one in scope; 1 but
    for multi-worker)."""
    strategy = strategy or tf.distribute.get_strategy()
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        spec = strategy.cluster_resolver.cluster_spec()
        # A "chief" task is a worker too (a TF_CONFIG with chief + workers).
        return max(
            1, sum(spec.num_tasks(t) for t in ("chief", "worker") if t in spec.jobs)
        )
    return 1


def _replica_context():
    """The replica context of a multi-replica step (None otherwise)."""
    if num_replicas() == 1:
        return None
    context = tf.distribute.get_replica_context()
    if context is None:
        raise RuntimeError(
            "Under a multi-replica strategy the DP train step runs in a "
            "replica context, inside Keras's fit or train_on_batch."
        )
    return context


def is_first_replica() -> tf.Tensor | bool:
    """This replica adds the step's noise: True alone, else a scalar bool."""
    context = _replica_context()
    if context is None:
        return True
    return tf.equal(context.replica_id_in_sync_group, 0)


def max_over_replicas(values: tf.Tensor) -> tf.Tensor:
    """Each entry of a vector (G,): its largest value over the replicas
    (itself alone)."""
    context = _replica_context()
    if context is None:
        return values
    # Each replica writes its vector in its own row and the SUM all-reduce
    # gathers them exactly (adding zeros). Not all_gather: its collective ops
    # clash between two MirroredStrategy objects of one process.
    values = tf.cast(values, tf.float32)
    own = tf.one_hot(context.replica_id_in_sync_group, num_replicas())[:, None]
    gathered = context.all_reduce(tf.distribute.ReduceOp.SUM, own * values[None, :])
    return tf.reduce_max(gathered, axis=0)


def released_on_every_replica(noisy: list[tf.Tensor]) -> list[tf.Tensor]:
    """Each replica's noisy sum -> 1/R of the released update (their sum).

    Keras's optimizer transforms each replica's gradient (`clipnorm`,
    `global_clipnorm`, `clipvalue`) BEFORE it sums them. Applied to the
    first replica's term alone, a clip would cap the noise and let the other
    replicas' data through unnoised: a sample's presence would show. So the
    sum is taken here (an all-reduce) and every replica holds the same
    1/R of it; the optimizer's per-replica steps and its own sum then act on
    the released update only. Alone: `noisy` unchanged.
    """
    context = _replica_context()
    if context is None:
        return list(noisy)
    released = context.all_reduce(tf.distribute.ReduceOp.SUM, list(noisy))
    return [g / num_replicas() for g in released]


def sum_over_replicas(value: tf.Tensor) -> tf.Tensor:
    """A scalar summed over the replicas (itself alone), e.g. the rows of
    the global batch. In the cross-replica context (a callback of `fit`,
    such as dynamic clipping's) a batch is whole: `value` itself."""
    if num_replicas() > 1 and tf.distribute.in_cross_replica_context():
        return value
    context = _replica_context()
    if context is None:
        return value
    total = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(value, tf.float32))
    return tf.cast(total, value.dtype)


#: Iterators of distributed datasets known to hand each replica its own
#: share of one global batch per step (see `mark_splitting`).
_SPLITTING_ITERATORS: weakref.WeakSet = weakref.WeakSet()
_MARKED_CLASSES: dict[type, type] = {}


def mark_splitting(dataset: tf.distribute.DistributedDataset):
    """Register every iterator `dataset` makes from now on as one that
    splits each global batch over the replicas (`splits_batches`).

    For datasets that do: `strategy.experimental_distribute_dataset`'s
    (what Keras's `fit` makes of data under a strategy), and the ones a DP
    model's `fit` has checked (`distributed_poisson_batches`, declared
    ones). A DP model's train function refuses other iterators under
    several replicas: `distribute_datasets_from_function(lambda _: ds)`
    gives every replica a whole batch, each sample counted R times.

    Returns:
        `dataset` (its class becomes a registering subclass of its own).
    """
    cls = type(dataset)
    if cls in _MARKED_CLASSES.values():  # marked already
        return dataset
    if cls not in _MARKED_CLASSES:

        def __iter__(self):  # noqa: N807 (the iterator protocol)
            iterator = cls.__iter__(self)
            _SPLITTING_ITERATORS.add(iterator)
            return iterator

        _MARKED_CLASSES[cls] = type(cls.__name__, (cls,), {"__iter__": __iter__})
    dataset.__class__ = _MARKED_CLASSES[cls]
    return dataset


def splits_batches(iterator) -> bool:
    """Whether `iterator` comes from a dataset `mark_splitting` registered."""
    return iterator in _SPLITTING_ITERATORS  # False for any other object


def sums_replica_gradients(optimizer, variables=()) -> bool:
    """True when `optimizer` does nothing to a replica's gradient but add it
    to the others' (then the released update needs no all-reduce of its
    own): exactly one of Keras's stock optimizer classes, without
    `clipnorm`, `global_clipnorm`, `clipvalue` or gradient accumulation
    (read when the train step is traced, as Keras reads them), none of its
    gradient-path methods replaced on the instance, and none of `variables`
    overwritten with its gradient (`overwrite_with_gradient`).
    Anything else (a subclass, a wrapper, a clipping option) is not assumed
    linear.
    """
    stock = (
        keras.optimizers.SGD,
        keras.optimizers.Adam,
        keras.optimizers.AdamW,
        keras.optimizers.Adamax,
        keras.optimizers.Adagrad,
        keras.optimizers.Adadelta,
        keras.optimizers.RMSprop,
        keras.optimizers.Nadam,
        keras.optimizers.Ftrl,
        keras.optimizers.Lion,
        keras.optimizers.Lamb,
    )
    gradient_path = (
        "apply",
        "apply_gradients",
        "_filter_empty_gradients",
        "_clip_gradients",
        "_backend_apply_gradients",
        "_backend_update_step",
        "_all_reduce_sum_gradients",
    )
    return (
        type(optimizer) in stock
        and not any(name in vars(optimizer) for name in gradient_path)
        and optimizer.clipnorm is None
        and optimizer.global_clipnorm is None
        and optimizer.clipvalue is None
        and not optimizer.gradient_accumulation_steps
        and not any(getattr(v, "overwrite_with_gradient", False) for v in variables)
    )


def distributed_poisson_batches(
    strategy: tf.distribute.Strategy,
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    seed: int | None = None,
    *,
    padding: str = "none",
    nb_samples: int | None = None,
):
    """Poisson batches of the whole dataset for `fit` under `strategy`.

    Every worker holds the whole arrays and samples its own shard, the rows
    i with i % W == w (W workers), at the rate q = batch_size / N; it splits
    its batch over its local replicas (rows j::k of its batch to replica j).
    Each row is drawn by one worker only, independently of every other row,
    so the union over the workers of one step is a Poisson sample of all N
    rows at rate q, whatever the workers' seeds; with one `seed`, it is
    exactly the batch `data.poisson_batches(x, y, batch_size, seed)` draws.
    Every worker takes ceil(N / B) steps per epoch.

    Args:
        strategy: the `MirroredStrategy` or `MultiWorkerMirroredStrategy`
            the model is built under.
        x: the WHOLE training inputs (identical on every worker), N rows.
        y: their labels.
        batch_size: the expected GLOBAL batch size B.
        seed: None (default): each worker's operating-system entropy (secret
            batches). An int: reproducible batches, reported as not secret.
        padding: "buckets" pads each replica's batch with masked rows to a
            few sizes (for `jit_compile=True`); "none" (default) does not.
        nb_samples: a public N >= len(x) for q and the steps, as in
            `data.poisson_batches` (None: len(x), public).

    Returns:
        A distributed dataset whose provenance (`data.sampling_provenance`)
        is the whole dataset's: N rows, expected batch size B, Poisson.
    """
    require_one_of("padding", padding, POISSON_PADDINGS, "distributed_poisson_batches")
    n = public_nb_samples(len(x), nb_samples)
    steps = steps_per_epoch(batch_size / n) if 0 < batch_size <= n else 0

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        local = context.num_replicas_in_sync // context.num_input_pipelines
        shard = (context.input_pipeline_id, context.num_input_pipelines)
        ds = poisson_batches(x, y, batch_size, seed, shard=shard, nb_samples=n)

        def pieces(*batch):
            rows = tf.shape(batch[-1])[0]

            def piece(j):
                j = tf.cast(j, tf.int32)  # a batch may have fewer rows than j
                taken = tf.range(j, tf.maximum(rows, j), local)
                return tuple(tf.gather(t, taken) for t in batch)

            return tf.data.Dataset.range(local).map(piece)

        if local > 1:
            ds = ds.flat_map(pieces)
        if padding == "buckets":
            ds = ds.map(
                bucket_padding(-(-n // context.num_replicas_in_sync), batch_size / n)
            )
        return ds.apply(tf.data.experimental.assert_cardinality(steps * local))

    distributed = strategy.distribute_datasets_from_function(dataset_fn)
    # Its cardinality counts a worker's elements (one per local replica and
    # step); Keras reads it as steps per epoch, so it would run past the end.
    distributed._cardinality = steps
    return _with_provenance(
        distributed,
        SamplingProvenance(
            "poisson", n, int(batch_size), seed is not None, padding=padding
        ),
    )


def reducible_logs(logs: dict) -> dict:
    """A step's logs in the shape Keras can reduce over the workers.

    Under `MultiWorkerMirroredStrategy` Keras 3 averages each log over the
    replicas along axis 0, which a scalar lacks (tensorflow#72388: every fit
    fails); a scalar becomes shape (1,), and the average a scalar again.
    Elsewhere the logs are returned unchanged.
    """
    strategy = tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return logs
    return {
        key: tf.reshape(value, (1,))
        if tf.convert_to_tensor(value).shape.rank == 0
        else value
        for key, value in logs.items()
    }


def local_tf_configs(workers: int, chief: bool = False) -> list[str]:
    """TF_CONFIG values (JSON) of a `workers`-process cluster on this machine,
    one per process: 127.0.0.1 on ports free when called (examples, tests
    and benchmarks start the processes; a port taken in between makes the
    cluster fail to start, never train wrongly). With `chief`, the first
    process is the "chief" task and the others "worker" tasks."""
    sockets = [socket.socket() for _ in range(workers)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        addresses = [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    finally:
        for s in sockets:
            s.close()
    if not chief:
        cluster = {"worker": addresses}
        tasks = [("worker", i) for i in range(workers)]
    else:
        cluster = {"chief": addresses[:1], "worker": addresses[1:]}
        tasks = [("chief", 0)] + [("worker", i) for i in range(workers - 1)]
    return [
        json.dumps({"cluster": cluster, "task": {"type": kind, "index": index}})
        for kind, index in tasks
    ]


__all__ = [
    "SUPPORTED_STRATEGIES",
    "check_strategy",
    "distribute_and_mark",
    "distributed_poisson_batches",
    "is_first_replica",
    "local_tf_configs",
    "mark_splitting",
    "max_over_replicas",
    "num_replicas",
    "num_workers",
    "reducible_logs",
    "released_on_every_replica",
    "splits_batches",
    "sum_over_replicas",
    "sums_replica_gradients",
]

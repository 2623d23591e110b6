"""``SuppressCtrl``: the sparsity schedule and the mask updates of suppress privacy.

Reference: MindArmour ``mindarmour.privacy.sup_privacy`` (``SuppressCtrl``,
``SuppressPrivacyFactory``), ported to Keras 3. Parameters are the network's
``weights`` (trainable and not, in order) matched by substring on
``variable.path``; ``grad_idx`` indexes ``network.trainable_variables``.
The rules and constants are MindArmour's (restated in ``docs/ports.md``).

Departures, each refusing instead of guessing:

- a ``grad_idx`` that does not point at the parameter its ``layer_name``
  matched is a ValueError (MindArmour would mask another gradient);
- the per-weight update rule is vectorised (same result, ties at the
  threshold still resolved by flat index);
- ``calc_actual_sparse_for_conv`` finds the kernels of Keras layers named
  ``conv1`` / ``conv2``, else of the first two convolution layers.
"""

from __future__ import annotations

import logging
from typing import Any

import keras
import numpy as np

from .._keras_utils import nested_layers
from ._checks import check_positive_int, check_type, check_value
from .masks import DeWeight, GradMask, MaskLayerDes

logger = logging.getLogger("deel_lipdp_ext.suppress")

WEIGHT_LOWER_BOUND = 0.005
SPARSE_VIBRA = 0.02
SPARSE_VALID_MAX_WEIGHT = 0.02
ADD_NOISE_THD = 0.50
NOISE_VOLUME = 0.1
BASE_GROUND_THD = 1e-7
APPROXIMITY_SIZE = 10000


def scheduled_sparsity(
    cur_step: int,
    mask_start_step: int,
    mask_all_steps: int,
    sparse_start: float,
    sparse_end: float,
) -> float:
    """Cubic schedule ``end + (start - end) (1 - t)^3``, ``t`` the elapsed fraction."""
    t = (cur_step - mask_start_step) / mask_all_steps
    return sparse_end + (sparse_start - sparse_end) * (1 - t) ** 3


def update_layer_masks(
    w: np.ndarray,
    mul: np.ndarray,
    thd: float,
    stop_pos: int,
    wmax: float,
    lr: float,
    *,
    min_num: int,
    is_lower_clip: bool,
    is_add_noise: bool,
    upper_bound: float,
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """New ``(mul, add, (suppressed, upper-clipped, lower-clipped, noised))``.

    The first matching rule per weight, in flat order: already suppressed ->
    ``add = w / lr``; ``|w| <= thd`` -> suppressed while the quota
    ``min(size - min_num, stop_pos)`` lasts, else pushed to magnitude
    ``min(0.005, thd)``; lower clip to 0.005; upper clip to ``upper_bound``;
    otherwise kept (with uniform noise in +-0.1 on ``|w| > 0.5`` when asked;
    the noise comes from NumPy's global generator, as upstream).
    """
    w = np.asarray(w, np.float64).reshape(-1)
    size = w.size
    magnitude = np.abs(w)
    positive = w > 0
    new_mul = np.ones(size, np.float32)
    add = np.zeros(size, np.float64)
    noise_bound = min(ADD_NOISE_THD, max(NOISE_VOLUME * 10, 0.75 * wmax))

    already = np.asarray(mul).reshape(-1) <= 0
    candidate = ~already & (magnitude <= thd)
    events = already | candidate
    before = np.cumsum(events) - events  # the running count m at each weight
    limit = min(size - min_num, stop_pos)
    suppress = candidate & (before < limit)
    floor_push = candidate & ~suppress
    rest = ~events
    lower = rest & is_lower_clip & (magnitude <= WEIGHT_LOWER_BOUND)
    lower &= thd > 0.5 * WEIGHT_LOWER_BOUND
    rest &= ~lower
    upper = rest & (magnitude > upper_bound)
    rest &= ~upper
    noised = rest & is_add_noise & (magnitude > noise_bound)

    zeroed = already | suppress
    new_mul[zeroed] = 0.0
    add[zeroed] = w[zeroed] / lr
    b = min(WEIGHT_LOWER_BOUND, thd)
    for selected, target in ((floor_push, b), (lower, WEIGHT_LOWER_BOUND)):
        add[selected] = np.where(positive, w - target, w + target)[selected] / lr
    add[upper] = np.where(positive, w - upper_bound, w + upper_bound)[upper] / lr
    add[noised] = np.random.uniform(-NOISE_VOLUME, NOISE_VOLUME, int(noised.sum())) / lr
    counts = (
        int(zeroed.sum()),
        int(upper.sum()),
        int(floor_push.sum() + lower.sum()),
        int(noised.sum()),
    )
    return new_mul, add.astype(np.float32), counts


class SuppressCtrl:
    """Controls when and how much the masked parameters are suppressed.

    Args:
        networks: the Keras model being trained (built).
        mask_layers: list of ``MaskLayerDes``.
        end_epoch: last epoch of the schedule, ``start_epoch <= end_epoch <= 100``.
        batch_num: training steps per epoch.
        start_epoch: first epoch of the schedule (1-based, positive).
        mask_times: number of mask updates over the schedule.
        lr: the SGD learning rate, ``0 < lr <= 0.5`` (the add-mask is divided
            by it so that one SGD step lands each weight on its target).
        sparse_end: final sparsity, a float in ``(0, 1)``.
        sparse_start: initial sparsity, ``0 <= sparse_start < sparse_end``.

    Raises:
        TypeError, ValueError: as MindArmour's checks (each names the argument).
    """

    def __init__(
        self,
        networks: keras.Model,
        mask_layers: list,
        end_epoch: int,
        batch_num: int,
        start_epoch: int,
        mask_times: int,
        lr: float,
        sparse_end: float,
        sparse_start: float,
    ):
        check_type("networks", networks, (keras.Model,))
        check_type("mask_layers", mask_layers, (list,))
        self.networks = networks
        self.mask_layers = mask_layers
        self.end_epoch = check_positive_int("end_epoch", end_epoch)
        self.batch_num = check_positive_int("batch_num", batch_num)
        self.start_epoch = check_positive_int("start_epoch", start_epoch)
        self.mask_times = check_positive_int("mask_times", mask_times)
        self.lr = check_type("lr", lr, (int, float))
        check_value("lr", lr, lr > 0, "> 0")
        self.sparse_end = check_type("sparse_end", sparse_end, (float,))
        self.sparse_start = check_type("sparse_start", sparse_start, (int, float))
        check_value("sparse_start", sparse_start, sparse_start >= 0, ">= 0")
        check_value("lr", lr, lr <= 0.5, "<= 0.5")
        check_value(
            "start_epoch",
            start_epoch,
            start_epoch <= end_epoch,
            f"<= end_epoch={end_epoch}",
        )
        check_value("end_epoch", end_epoch, end_epoch <= 100, "<= 100")

        self.weight_lower_bound = WEIGHT_LOWER_BOUND
        self.sparse_vibra = SPARSE_VIBRA
        self.sparse_valid_max_weight = SPARSE_VALID_MAX_WEIGHT
        self.add_noise_thd = ADD_NOISE_THD
        self.noise_volume = NOISE_VOLUME
        self.base_ground_thd = BASE_GROUND_THD
        self.mask_all_steps = (end_epoch - start_epoch + 1) * batch_num
        self.mask_step_interval = self.mask_all_steps / mask_times
        check_value(
            "mask_times",
            mask_times,
            self.mask_step_interval > 0,
            "small enough for a positive step interval",
        )
        if self.mask_step_interval <= 10 or self.mask_step_interval >= 20:
            logger.info(
                "mask_step_interval=%s is outside (10, 20): the sparsity precision "
                "may be poor.",
                self.mask_step_interval,
            )
        check_value("sparse_end", sparse_end, 0 < sparse_end < 1, "in (0, 1)")
        check_value(
            "sparse_start",
            sparse_start,
            sparse_start < sparse_end,
            f"< sparse_end={sparse_end}",
        )

        self.cur_sparse = 0.0
        self._mask_started = False
        self.mask_start_step = 0
        self.mask_prev_step = 0
        self.to_do_mask = False
        self.model = None
        self._match_mask_layers()
        self.mask_initialized = True

    # ------------------------------------------------------------ matching
    def _match_mask_layers(self) -> None:
        names, indices = set(), set()
        for des in self.mask_layers:
            if not isinstance(des, MaskLayerDes):
                raise ValueError(
                    "Each element of `mask_layers` must be a MaskLayerDes. "
                    f"Received: {des!r}"
                )
            if des.layer_name in names or des.grad_idx in indices:
                raise ValueError(
                    "`mask_layers` has a duplicate layer_name or grad_idx. "
                    f"Received: {des!r}"
                )
            names.add(des.layer_name)
            indices.add(des.grad_idx)
            des.inited = False
        params = self.networks.weights
        trainable = self.networks.trainable_variables
        self.grads_mask_list = [GradMask() for _ in params]
        self.de_weight_mask_list = [DeWeight() for _ in params]
        self.grad_idx_map = [-1] * len(params)
        for m, param in enumerate(params):
            des = next(
                (
                    d
                    for d in self.mask_layers
                    if not d.inited and d.layer_name in param.path
                ),
                None,
            )
            if des is None:
                continue
            des.inited = True
            j = des.grad_idx
            if j >= len(trainable) or trainable[j] is not param:
                target = trainable[j].path if j < len(trainable) else "nothing"
                raise ValueError(
                    f"`grad_idx`={j} of mask layer {des.layer_name!r} points at "
                    f"{target} in network.trainable_variables, but the layer name "
                    f"matched the parameter {param.path!r}."
                )
            self.grads_mask_list[j] = GradMask(tuple(param.shape), des)
            self.de_weight_mask_list[j] = DeWeight(tuple(param.shape), mask_able=True)
            self.grad_idx_map[m] = j
        for des in self.mask_layers:
            if not des.inited:
                raise ValueError(f"can't match this mask layer: {des.layer_name!r}")

    # -------------------------------------------------------------- status
    @property
    def mask_started(self) -> bool:
        return self._mask_started

    @mask_started.setter
    def mask_started(self, value: bool) -> None:
        self._mask_started = bool(value)
        if self.model is not None:
            self.model.suppress_started.assign(1.0 if value else 0.0)

    def update_status(
        self, cur_epoch: int, cur_step: int, cur_step_in_epoch: int
    ) -> None:
        """Decides whether the mask is updated after this (1-based) step."""
        if not self.mask_initialized:
            self.mask_started = False
        elif self.start_epoch <= cur_epoch <= self.end_epoch or self.mask_started:
            if not self.mask_started:
                self.mask_started = True
                self.mask_start_step = cur_step
            if cur_step >= self.mask_prev_step + self.mask_step_interval:
                self.mask_prev_step = cur_step
                self.to_do_mask = True
            elif (
                cur_epoch == self.end_epoch and cur_step_in_epoch == self.batch_num - 2
            ):
                self.mask_prev_step = cur_step
                self.to_do_mask = True
            else:
                self.to_do_mask = False
        else:
            self.to_do_mask = False
            self.mask_started = False

    # ------------------------------------------------------------- updates
    def update_mask(self, networks, cur_step: int, target_sparse: float = 0.0) -> None:
        """Raises the sparsity along the schedule and updates every masked layer."""
        if self.sparse_end <= 0:
            return
        last = self.cur_sparse
        if target_sparse > 0:
            sparse = target_sparse
        else:
            sparse = scheduled_sparsity(
                cur_step,
                self.mask_start_step,
                self.mask_all_steps,
                self.sparse_start,
                self.sparse_end,
            )
        self.cur_sparse = max(
            self.sparse_start, max(last, min(sparse, self.sparse_end))
        )
        for m, param in enumerate(networks.weights):
            j = self.grad_idx_map[m]
            if j < 0 or not self.grads_mask_list[j].mask_able:
                continue
            mask = self.grads_mask_list[j]
            n = mask.para_num
            sparse_min_thd = 1 - min(mask.min_num, n) / n
            stop = int(n * min(sparse_min_thd, self.cur_sparse))
            last_pos = mask.sparse_pos_list[-1]
            if stop <= 0 or (
                mask.is_approximity and m > 0 and stop < last_pos + mask.part_num
            ):
                continue
            w = np.asarray(param.numpy(), np.float64).reshape(-1)
            magnitude = np.abs(w)
            wmax = float(magnitude.max())
            if m == 0 and wmax < self.sparse_valid_max_weight:
                return
            if mask.is_approximity and m > 0:
                self.update_mask_layer_approximity(w, magnitude, stop, j)
            else:
                thd = float(np.partition(magnitude, stop - 1)[stop - 1])
                self.update_mask_layer(w, thd, stop, wmax, j)

    def update_mask_layer(
        self,
        weight_array_flat: np.ndarray,
        sparse_weight_thd: float,
        sparse_stop_pos: int,
        weight_abs_max: float,
        layer_index: int,
    ) -> None:
        """Exact per-weight update of one layer (``update_layer_masks``)."""
        mask = self.grads_mask_list[layer_index]
        de_weight = self.de_weight_mask_list[layer_index]
        mul, add, counts = update_layer_masks(
            weight_array_flat,
            mask.mul_mask_array_flat,
            sparse_weight_thd,
            sparse_stop_pos,
            weight_abs_max,
            self.lr,
            min_num=mask.min_num,
            is_lower_clip=mask.is_lower_clip,
            is_add_noise=mask.is_add_noise,
            upper_bound=mask.upper_bound,
        )
        mask.mul_mask_array_flat = mul
        de_weight.add_mask_array_flat = add
        mask.update()
        de_weight.update()
        logger.info(
            "layer %s: threshold %.6g, suppressed %d, upper-clipped %d, "
            "lower-clipped %d, noised %d",
            mask.layer_name,
            sparse_weight_thd,
            *counts,
        )
        mask.sparse_pos_list.append(counts[0])

    def update_mask_layer_approximity(
        self,
        weight_array_flat: np.ndarray,
        weight_array_flat_abs: np.ndarray,
        actual_stop_pos: int,
        layer_index: int,
    ) -> float | None:
        """Threshold-only update of a large layer (> 10 000 weights): no clipping,
        no noise. Returns the threshold, or None when no part moved."""
        mask = self.grads_mask_list[layer_index]
        de_weight = self.de_weight_mask_list[layer_index]
        last = mask.sparse_pos_list[-1]
        init = last <= 0
        k = max(0, int((actual_stop_pos - last) / mask.part_num))
        thresholds = []
        if k > 0:
            parts_abs = np.array_split(weight_array_flat_abs, mask.part_num)
            parts_mul = np.array_split(mask.mul_mask_array_flat, mask.part_num)
            for part_abs, part_mul in zip(parts_abs, parts_mul, strict=True):
                candidates = part_abs if init else np.unique(part_abs[part_mul > 0])
                k_part = min(k, len(candidates) - 1)
                if k_part <= 0:
                    continue
                thd_part = float(np.partition(candidates, k_part - 1)[k_part - 1])
                if thd_part > 0 or init:
                    thresholds.append(thd_part)
        if not thresholds:
            return None
        thd = float(np.mean(thresholds))
        mul = (weight_array_flat_abs > thd).astype(np.float32)
        add = np.where(mul <= 0, weight_array_flat / self.lr, 0.0).astype(np.float32)
        mask.mul_mask_array_flat = mul
        de_weight.add_mask_array_flat = add
        mask.update()
        de_weight.update()
        suppressed = int(mask.para_num - mul.sum())
        mask.sparse_pos_list.append(suppressed)
        if init:
            logger.info(
                "layer %s: first sparsity %.4f",
                mask.layer_name,
                suppressed / mask.para_num,
            )
        return thd

    def reset_zeros(self) -> None:
        """Disarms every add-mask (they are one-shot corrections)."""
        for de_weight in self.de_weight_mask_list:
            de_weight.reset_zeros()

    # ------------------------------------------------------------- sparsity
    def calc_theoretical_sparse_for_conv(self) -> tuple[float, float, float]:
        """Fraction of suppressed entries in the masks of gradients 0 and 1:
        ``(combined, first, second)``."""
        zeros, sizes = [], []
        for mask in self.grads_mask_list[:2]:
            zeros.append(int((mask.mul_mask_array_flat <= 0).sum()))
            sizes.append(mask.mul_mask_array_flat.size)
        while len(zeros) < 2:
            zeros.append(0)
            sizes.append(1)
        return (
            sum(zeros) / sum(sizes),
            zeros[0] / sizes[0],
            zeros[1] / sizes[1],
        )

    def calc_actual_sparse_for_conv(self, networks) -> tuple[float, float, float]:
        """Fraction of ``|w| <= 1e-7`` in the first two convolution kernels:
        ``(combined, conv1, conv2)``; a missing kernel counts as ``[1.0]``."""
        kernels = _conv_kernels(networks)
        arrays = [
            np.abs(np.asarray(k.numpy())).reshape(-1)
            if k is not None
            else np.array([1.0])
            for k in kernels
        ]
        zeros = [int((a <= self.base_ground_thd).sum()) for a in arrays]
        sizes = [a.size for a in arrays]
        return sum(zeros) / sum(sizes), zeros[0] / sizes[0], zeros[1] / sizes[1]

    def calc_actual_sparse_for_layer(self, networks, layer_name: str) -> float:
        """Fraction of ``|w| <= 1e-7`` in the first parameter whose path contains
        ``layer_name``; 0.0 (and a log line) when there is none."""
        check_type("networks", networks, (keras.Model,))
        check_type("layer_name", layer_name, (str,))
        for param in networks.weights:
            if layer_name in param.path:
                values = np.abs(np.asarray(param.numpy())).reshape(-1)
                return float((values <= self.base_ground_thd).mean())
        logger.info("calc_actual_sparse_for_layer: no parameter matches %r", layer_name)
        return 0.0

    def calc_actual_sparse_for_fc1(self, networks) -> float:
        return self.calc_actual_sparse_for_layer(networks, "fc1/kernel")

    # ------------------------------------------------------------ save/load
    def get_config(self) -> dict[str, Any]:
        """Constructor arguments (mask layers as dicts) and the schedule state."""
        return {
            "mask_layers": [des.get_config() for des in self.mask_layers],
            "end_epoch": self.end_epoch,
            "batch_num": self.batch_num,
            "start_epoch": self.start_epoch,
            "mask_times": self.mask_times,
            "lr": self.lr,
            "sparse_end": self.sparse_end,
            "sparse_start": self.sparse_start,
            "state": {
                "cur_sparse": self.cur_sparse,
                "mask_started": self.mask_started,
                "mask_start_step": self.mask_start_step,
                "mask_prev_step": self.mask_prev_step,
                "to_do_mask": self.to_do_mask,
                "sparse_pos_lists": {
                    str(j): list(mask.sparse_pos_list)
                    for j, mask in enumerate(self.grads_mask_list)
                    if mask.mask_able
                },
            },
        }

    @classmethod
    def from_config(cls, networks, config: dict[str, Any]) -> SuppressCtrl:
        config = dict(config)
        state = config.pop("state")
        layers = [MaskLayerDes(**c) for c in config.pop("mask_layers")]
        ctrl = cls(networks, layers, **config)
        ctrl.cur_sparse = state["cur_sparse"]
        ctrl.mask_started = state["mask_started"]
        ctrl.mask_start_step = state["mask_start_step"]
        ctrl.mask_prev_step = state["mask_prev_step"]
        ctrl.to_do_mask = state["to_do_mask"]
        for j, positions in state["sparse_pos_lists"].items():
            ctrl.grads_mask_list[int(j)].sparse_pos_list = list(positions)
        return ctrl


def _conv_kernels(networks) -> list:
    """Kernels of the layers named conv1/conv2, else of the first two convolutions."""
    conv_types = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
    convs = [
        layer for layer in nested_layers(networks) if isinstance(layer, conv_types)
    ]
    named = {layer.name: layer for layer in convs}
    picked = []
    for i, name in enumerate(("conv1", "conv2")):
        layer = named.get(name) or (convs[i] if i < len(convs) else None)
        picked.append(None if layer is None else layer.kernel)
    return picked


class SuppressPrivacyFactory:
    """Factory of suppress-privacy controllers (MindArmour's entry point)."""

    @staticmethod
    def create(
        networks: keras.Model,
        mask_layers: list,
        policy: str = "local_train",
        end_epoch: int = 10,
        batch_num: int = 20,
        start_epoch: int = 3,
        mask_times: int = 1000,
        lr: float = 0.05,
        sparse_end: float = 0.90,
        sparse_start: float = 0.0,
    ) -> SuppressCtrl:
        """A ``SuppressCtrl``; only ``policy="local_train"`` exists."""
        check_type("policy", policy, (str,))
        if policy != "local_train":
            raise ValueError(
                f"Only local training is supported now, but got policy={policy!r}"
            )
        return SuppressCtrl(
            networks,
            mask_layers,
            end_epoch,
            batch_num,
            start_epoch,
            mask_times,
            lr,
            sparse_end,
            sparse_start,
        )

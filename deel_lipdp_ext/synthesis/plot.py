"""Figures of a full MAD competition (four syntheses): images and loss curves.

Reference: plenoptic ``po.plot.mad_imshow_all`` / ``mad_loss_all`` (1.x:
``display_mad_image_all`` / ``plot_loss_all``), drawn with matplotlib from the
NumPy values of the TensorFlow port (channels-last images).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .mad_competition import MADCompetition


def _check_same_image(*mads: MADCompetition) -> None:
    reference = np.asarray(mads[0].image)
    for mad in mads[1:]:
        if not np.allclose(reference, np.asarray(mad.image)):
            raise ValueError(
                "All four instances of MADCompetition must have same image!"
            )


def _metric_name(metric) -> str:
    return getattr(metric, "__name__", type(metric).__name__)


def _show(ax, image: np.ndarray, title: str, zoom: float, **kwargs) -> None:
    image = np.asarray(image)[0]
    if image.shape[-1] == 1:
        image = image[..., 0]
        kwargs.setdefault("cmap", "gray")
    kwargs.setdefault("vmin", 0)
    kwargs.setdefault("vmax", 1)
    ax.imshow(np.clip(image, 0, 1) if image.ndim == 3 else image, **kwargs)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def mad_imshow_all(
    mad_metric1_min: MADCompetition,
    mad_metric2_min: MADCompetition,
    mad_metric1_max: MADCompetition,
    mad_metric2_max: MADCompetition,
    metric1_name: str | None = None,
    metric2_name: str | None = None,
    zoom: float = 1,
    **kwargs,
):
    """3x2 figure: reference, initial (noisy) image, then min/max of each metric."""
    mads = (mad_metric1_min, mad_metric2_min, mad_metric1_max, mad_metric2_max)
    _check_same_image(*mads)
    name1 = metric1_name or _metric_name(mad_metric1_min.optimized_metric)
    name2 = metric2_name or _metric_name(mad_metric2_min.optimized_metric)
    size = 2.5 * zoom
    fig, axes = plt.subplots(3, 2, figsize=(2 * size, 3 * size))
    axes = axes.ravel()
    _show(axes[0], mad_metric1_min.image, "Reference image", zoom, **kwargs)
    _show(
        axes[1], mad_metric1_min.initial_image, "Initial (noisy) image", zoom, **kwargs
    )
    panels = (
        (mad_metric1_min, f"Minimize {name1}"),
        (mad_metric1_max, f"Maximize {name1}"),
        (mad_metric2_min, f"Minimize {name2}"),
        (mad_metric2_max, f"Maximize {name2}"),
    )
    for ax, (mad, label) in zip(axes[2:], panels, strict=True):
        iteration = len(mad.losses) - 1
        _show(
            ax, mad.mad_image, f"{label}\nMAD [iteration={iteration}]", zoom, **kwargs
        )
    fig.tight_layout()
    return fig


def mad_loss_all(
    mad_metric1_min: MADCompetition,
    mad_metric2_min: MADCompetition,
    mad_metric1_max: MADCompetition,
    mad_metric2_max: MADCompetition,
    metric1_name: str | None = None,
    metric2_name: str | None = None,
    metric1_kwargs: dict | None = None,
    metric2_kwargs: dict | None = None,
    min_kwargs: dict | None = None,
    max_kwargs: dict | None = None,
    figsize=(10, 5),
):
    """1x2 figure: metric 2 (left) and metric 1 (right) over iterations, per run."""
    mads = (mad_metric1_min, mad_metric2_min, mad_metric1_max, mad_metric2_max)
    _check_same_image(*mads)
    name1 = metric1_name or _metric_name(mad_metric1_min.optimized_metric)
    name2 = metric2_name or _metric_name(mad_metric2_min.optimized_metric)
    metric1_kwargs = {"c": "C0", **(metric1_kwargs or {})}
    metric2_kwargs = {"c": "C1", **(metric2_kwargs or {})}
    min_kwargs = {"linestyle": "--", **(min_kwargs or {})}
    max_kwargs = {"linestyle": "-", **(max_kwargs or {})}
    fig, axes = plt.subplots(1, 2, figsize=figsize)
    runs = (
        (mad_metric1_min, name1, metric1_kwargs, min_kwargs, "Minimize"),
        (mad_metric1_max, name1, metric1_kwargs, max_kwargs, "Maximize"),
        (mad_metric2_min, name2, metric2_kwargs, min_kwargs, "Minimize"),
        (mad_metric2_max, name2, metric2_kwargs, max_kwargs, "Maximize"),
    )
    for mad, name, color, style, verb in runs:
        # Each axis shows one metric: metric 2 left, metric 1 right.
        if name == name1:
            left, right = mad.reference_metric_loss, mad.optimized_metric_loss
        else:
            left, right = mad.optimized_metric_loss, mad.reference_metric_loss
        label = f"{verb} {name}"
        axes[0].plot(np.asarray(left), label=label, **color, **style)
        axes[1].plot(np.asarray(right), label=label, **color, **style)
    axes[0].set(title=name2, ylabel="Loss", xlabel="Synthesis iteration")
    axes[1].set(title=name1, ylabel="Loss", xlabel="Synthesis iteration")
    axes[1].legend(loc="center left", bbox_to_anchor=(1.05, 0.5))
    fig.tight_layout()
    return fig

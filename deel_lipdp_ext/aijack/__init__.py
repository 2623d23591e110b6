"""TensorFlow ports of AIJack's differential-privacy tools.

AIJack (``Koukyosyumei/AIJack``) is a PyTorch library of attacks on machine
learning models and defences against them. Ported here:

- ``moment_accountant.GeneralMomentAccountant``: its moment (Renyi DP)
  accountant, with the order searches of ``order_search``;
- ``dpsgd_manager.DPSGDManager``: its DP-SGD manager (Poisson lots,
  micro-batches, a DP wrapper of a Keras optimizer).

AIJack's MI-FACE model inversion is in ``deel_lipdp_ext.attacks``. What each
port keeps and where it departs from AIJack: ``docs/ports.md``. Both names
are loaded on first access.
"""

__all__ = ["DPSGDManager", "GeneralMomentAccountant"]


def __getattr__(name):
    if name == "GeneralMomentAccountant":
        from .moment_accountant import GeneralMomentAccountant

        return GeneralMomentAccountant
    if name == "DPSGDManager":
        from .dpsgd_manager import DPSGDManager

        return DPSGDManager
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

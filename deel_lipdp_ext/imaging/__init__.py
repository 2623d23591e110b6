"""Image-similarity metrics shared by the cloak and MAD ports.

``metrics`` holds the differentiable SSIM, MS-SSIM, MSE and squared Pearson
correlation of channels-last ``(batch, height, width, channels)`` images with
values in ``[0, 1]``; ``_ops`` the private filters and padding they use.
"""

from .metrics import MS_SSIM_POWER_FACTORS, ms_ssim, mse, pearson_squared, ssim

__all__ = ["MS_SSIM_POWER_FACTORS", "ms_ssim", "mse", "pearson_squared", "ssim"]

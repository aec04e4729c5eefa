"""mimic_fast: fast mimic learning (Ba & Caruana 2014) with fused bottleneck-MLP kernels.

    import mimic_fast as mf
    y = mf.bottleneck_mlp(x, U, V, b1, W, b2, activation="relu")
    loss = mf.mimic_loss(x, U, V, b1, W, b2, teacher_logits)

The core import is light: the pipeline (models, data, train, cli) loads only when imported.
"""
from . import convert, export, nn
from .dispatch import info
from .functional import bottleneck_mlp, kd_loss, logit_mse_loss, mimic_loss

__version__ = "0.1.0"
__all__ = ["bottleneck_mlp", "mimic_loss", "logit_mse_loss", "kd_loss", "info", "nn", "convert", "export"]

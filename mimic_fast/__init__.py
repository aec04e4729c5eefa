"""mimic_fast: fast mimic learning (Ba & Caruana 2014) with fused bottleneck-MLP kernels.

    import mimic_fast as mf
    y = mf.bottleneck_mlp(x, U, V, b1, W, b2, activation="relu")
    loss = mf.mimic_loss(x, U, V, b1, W, b2, teacher_logits)

The core import is light: the pipeline (data, files, teachers, train, pipeline, cli) loads only when
imported. Imports only point down, bottom to top: base (_io, activations, _checks, testing,
distributed), the ops backends, dispatch, ops.autograd, functional, nn, models/convert/export, this
package root, data, files, teachers, train, pipeline, and the entry points (cli, sweep, demo, bench);
tests/test_layers.py holds the order (LAYERS) and enforces it.
"""
from . import convert, export, nn
from .dispatch import info
from .functional import bottleneck_mlp, kd_loss, logit_mse_loss, mimic_loss

__version__ = "0.1.0"
__all__ = ["bottleneck_mlp", "mimic_loss", "logit_mse_loss", "kd_loss", "info", "nn", "convert", "export"]

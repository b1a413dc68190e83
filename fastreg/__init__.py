"""fastreg: fused multi-tensor weight penalties for PyTorch: L1, L2, elastic net and group
lasso, toward zero or toward reference (pretrained) weights.

    loss = loss + fastreg.penalty(model, l2=1e-4)

See ``fastreg.Penalty`` for the reusable form with ``add_to_grad_()``, ``prox_()`` and
``attach(optimizer)``.
"""

from fastreg._sparsity import GroupSparsity, ParameterSparsity, Sparsity, sparsity
from fastreg.api import Penalty, available_backends, l2_to_weight_decay, penalty

__all__ = ["penalty", "Penalty", "available_backends", "l2_to_weight_decay", "sparsity", "Sparsity",
           "ParameterSparsity", "GroupSparsity"]
__version__ = "0.1.0"

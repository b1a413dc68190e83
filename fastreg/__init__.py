"""fastreg: fused multi-tensor L1 / L2 / elastic-net weight penalties for PyTorch.

    loss = loss + fastreg.penalty(model, l2=1e-4)

See ``fastreg.Penalty`` for the reusable form with ``add_to_grad_()`` and ``prox_()``.
"""

from fastreg._sparsity import Sparsity, sparsity
from fastreg.api import Penalty, available_backends, l2_to_weight_decay, penalty

__all__ = ["penalty", "Penalty", "available_backends", "l2_to_weight_decay", "sparsity", "Sparsity"]
__version__ = "0.1.0"

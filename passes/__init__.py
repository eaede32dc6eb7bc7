"""fxopt.passes: one module per transformation; importing this package registers them all."""

import fxopt.passes.distill  # noqa: F401 - registers distill and strip_distill
from fxopt.passes.canonicalize import Canonicalize, EliminateDeadCode
from fxopt.passes.fold_batchnorm import FoldBatchNorm
from fxopt.passes.prune import PruneChannels
from fxopt.passes.quantize import QuantizeInt8
from fxopt.passes.slim import Slim

__all__ = ["Canonicalize", "EliminateDeadCode", "FoldBatchNorm", "PruneChannels", "QuantizeInt8", "Slim"]

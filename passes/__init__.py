"""fxopt.passes: one module per transformation; importing this package registers them all, and the
core's extension points it provides (`fxopt.extensions`): ``float_twin`` ``"int8"``,
``kept_channels`` ``"prune"`` and ``feature_hooks`` ``"distill"``."""

import fxopt.passes.distill  # noqa: F401 - registers distill and strip_distill
from fxopt.extensions import register_extension
from fxopt.passes.canonicalize import Canonicalize, EliminateDeadCode
from fxopt.passes.distill import hooked_copy, kept_channels, match_features
from fxopt.passes.finetune import Finetune, QuantAwareTraining
from fxopt.passes.fold_batchnorm import FoldBatchNorm
from fxopt.passes.prune import PruneChannels
from fxopt.passes.quantize import QuantizeInt8, float_twin
from fxopt.passes.slim import Slim

register_extension("float_twin", "int8", float_twin)
register_extension("kept_channels", "prune", kept_channels)
register_extension("feature_hooks", "distill", (match_features, hooked_copy))

__all__ = ["Canonicalize", "EliminateDeadCode", "Finetune", "FoldBatchNorm", "PruneChannels", "QuantAwareTraining", "QuantizeInt8", "Slim"]

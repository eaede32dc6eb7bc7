"""fxopt.distill: distillation losses and the fine-tune loop (training only; nothing here is exported).

    result = fxopt.distill.finetune(student, data, loss=nn.CrossEntropyLoss(), teacher=teacher,
                                    distill=Distill(logits=LogitKD(4.0)), steps=300, lr=1e-3)
"""

from fxopt.distill.loop import Distill, FinetuneResult, TensorBatches, finetune
from fxopt.distill.losses import ICKD, FeatureMSE, LogitKD, SigmoidKD, channel_correlation

__all__ = [
    "ICKD", "Distill", "FeatureMSE", "FinetuneResult", "LogitKD", "SigmoidKD", "TensorBatches",
    "channel_correlation", "finetune",
]

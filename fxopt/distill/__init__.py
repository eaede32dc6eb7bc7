"""fxopt.distill: distillation losses and the fine-tune loop (training only; nothing here is exported).

    result = fxopt.distill.finetune(student, data, loss=nn.CrossEntropyLoss(), teacher=teacher,
                                    distill=Distill(logits=LogitKD(4.0)), steps=300, lr=1e-3)
    result = fxopt.distill.finetune(student, recipe=fxopt.models.spec("camera_multitask").recipe, steps=100, lr=1e-3)

`resolve` turns compile's ``distill="kd" | "ickd" | [...]`` and ``recipe=`` into finetune's arguments.
"""

from fxopt.distill.loop import (
    Distill,
    FinetuneResult,
    RecipeBatches,
    TensorBatches,
    finetune,
    recipe_metric,
)
from fxopt.distill.losses import ICKD, FeatureMSE, LogitKD, OutputKD, SigmoidKD, channel_correlation
from fxopt.distill.resolve import FinetuneRequest, FinetuneSetup, resolve

__all__ = [
    "ICKD", "Distill", "FeatureMSE", "FinetuneRequest", "FinetuneResult", "FinetuneSetup", "LogitKD", "OutputKD", "RecipeBatches",
    "SigmoidKD", "TensorBatches", "channel_correlation", "finetune", "recipe_metric", "resolve",
]

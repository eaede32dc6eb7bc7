"""fxopt.distill: distillation losses and the fine-tune loop (training only; nothing here is exported).

    result = fxopt.distill.finetune(student, data, loss=nn.CrossEntropyLoss(), teacher=teacher,
                                    distill=Distill(logits=LogitKD(4.0)), steps=300, lr=1e-3)
    result = fxopt.distill.finetune(student, recipe=fxopt.models.spec("camera_multitask").recipe, steps=100, lr=1e-3)

`resolve` turns compile's ``distill="kd" | "ickd" | [...]`` and ``recipe=`` into finetune's arguments;
`choose_lr` picks the rate compile's ``finetune_lr=None`` runs at (the recipe's, else a range test);
`judge` tells whether a fine-tune left the model far below the input model.
"""

from fxopt.distill.device import available_devices, describe_device, training_device
from fxopt.distill.judge import (
    HeldBack,
    HeldOutJudge,
    advice,
    agreement,
    hold_back,
    judge_metrics,
)
from fxopt.distill.loop import (
    Distill,
    FinetuneResult,
    RecipeBatches,
    TensorBatches,
    finetune,
    recipe_metric,
    trial_loss,
)
from fxopt.distill.losses import ICKD, FeatureMSE, LogitKD, OutputKD, SigmoidKD, channel_correlation
from fxopt.distill.lr_range import LR_CANDIDATES, LrChoice, choose_lr, range_test
from fxopt.distill.resolve import FinetuneRequest, FinetuneSetup, resolve

__all__ = [
    "ICKD", "LR_CANDIDATES", "Distill", "FeatureMSE", "FinetuneRequest", "FinetuneResult", "FinetuneSetup", "HeldBack", "HeldOutJudge",
    "LogitKD", "LrChoice", "OutputKD", "RecipeBatches", "SigmoidKD", "TensorBatches", "advice", "agreement", "channel_correlation",
    "available_devices", "choose_lr", "describe_device", "finetune", "hold_back", "judge_metrics", "range_test", "recipe_metric",
    "resolve", "training_device", "trial_loss",
]

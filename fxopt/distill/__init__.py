"""fxopt.distill: distillation losses (training only; nothing here is exported)."""

from fxopt.distill.losses import ICKD, FeatureMSE, LogitKD, SigmoidKD, channel_correlation

__all__ = ["ICKD", "FeatureMSE", "LogitKD", "SigmoidKD", "channel_correlation"]

"""The local training and evaluation a site runs each round."""

from .loop import EvalResult, TrainResult, cosine_lr, evaluate, train_local

__all__ = ["EvalResult", "TrainResult", "cosine_lr", "evaluate", "train_local"]

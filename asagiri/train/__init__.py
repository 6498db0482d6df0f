"""The local training and evaluation a site runs each round."""

from .loop import EvalResult, TrainResult, evaluate, train_local

__all__ = ["EvalResult", "TrainResult", "evaluate", "train_local"]

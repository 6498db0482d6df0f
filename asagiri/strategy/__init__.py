"""Aggregation strategies (Flower-style hooks over pure arithmetic) and client selection."""

from ..aggregate import RunningSum, apply_weighted_delta
from .base import FedAvg, FitPlan, Strategy, build_strategy
from .selection import select_clients

__all__ = ["FedAvg", "FitPlan", "RunningSum", "Strategy", "apply_weighted_delta", "build_strategy", "select_clients"]

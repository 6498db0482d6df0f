"""A site's learning, apart from the network (``worker``)."""

from .worker import BudgetExhausted, SiteWorker

__all__ = ["BudgetExhausted", "SiteWorker"]

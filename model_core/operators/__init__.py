"""Monotone linear operators behind one interface (see :class:`MonotoneOperator`)."""

from .base import MonotoneOperator, Resolvent
from .conv import MultiTierOperator, tier_sizes
from .fc import FCOperator

__all__ = ["FCOperator", "MonotoneOperator", "MultiTierOperator", "Resolvent", "tier_sizes"]

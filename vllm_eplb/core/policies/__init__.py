"""Placement policies. Importing this package registers the built-in ones."""

from .base import PlanInput, Policy, get_policy, keep_in_place, policy_names, register_policy
from . import deepseek, greedy, min_move  # noqa: F401  (register "deepseek", "greedy", "min-move")

__all__ = ["PlanInput", "Policy", "get_policy", "keep_in_place", "policy_names", "register_policy"]

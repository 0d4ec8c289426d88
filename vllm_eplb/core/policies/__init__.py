"""Placement policies. Importing this package registers the built-in ones."""

from .base import PlanInput, Policy, get_policy, keep_in_place, policy_names, register_policy
from . import deepseek, greedy  # noqa: F401  (register "deepseek", "greedy")

__all__ = ["PlanInput", "Policy", "get_policy", "keep_in_place", "policy_names", "register_policy"]

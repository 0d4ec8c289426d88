"""The balancer core. Imports nothing from vLLM: it runs under a test harness, a
synthetic benchmark, or vLLM through `vllm_eplb.integration`."""

from .agreement import Agreement, AgreementError, new_gloo_group
from .balancer import Balancer, Comm, MoELayout
from .config import BalancerConfig
from .pass_clock import ForwardCounter, PassClock
from .placement import RoutingMaps, Topology, default_placement
from .state_machine import STATES, TRANSITIONS

__all__ = [
    "Agreement",
    "AgreementError",
    "Balancer",
    "BalancerConfig",
    "Comm",
    "ForwardCounter",
    "MoELayout",
    "PassClock",
    "RoutingMaps",
    "STATES",
    "TRANSITIONS",
    "Topology",
    "default_placement",
    "new_gloo_group",
]

from .backend import DeferredBackend, DelegatingBackend, LayerJob, TransferBackend, TransferError, TransferHandle
from .engine import InFlightStep, StepResult, TransferEngine
from .gloo import GlooBackend
from .plan import LayerPlan, RankPart, Transfer, plan_layer

__all__ = [
    "DeferredBackend",
    "DelegatingBackend",
    "GlooBackend",
    "InFlightStep",
    "LayerJob",
    "LayerPlan",
    "RankPart",
    "StepResult",
    "Transfer",
    "TransferBackend",
    "TransferEngine",
    "TransferError",
    "TransferHandle",
    "plan_layer",
]

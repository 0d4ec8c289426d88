"""The MixtureOfExperts model inside a served model, found the way the running release's
own runners find it (vLLM is imported when called, not at import)."""

from __future__ import annotations

from vllm_eplb.compat.guards import holds


def mixture_of_experts_model(model):
    """The model itself if it is a MixtureOfExperts with MoE layers, else a multimodal
    model's language model if that one is, else None."""
    if holds("get_mixture_of_experts_model"):
        from vllm.model_executor.models.interfaces import get_mixture_of_experts_model

        return get_mixture_of_experts_model(model)
    return _unwrapped_moe(model)


def _unwrapped_moe(model):
    """0.26.0's runners inline this (V1 GPUModelRunner.load_model, V2 eplb_utils._unwrap_moe);
    0.30.0 made it get_mixture_of_experts_model, whose contract (None when the language model
    cannot be fetched) it keeps."""
    from vllm.model_executor.models.interfaces import SupportsMultiModal, is_mixture_of_experts

    if is_mixture_of_experts(model):
        return model
    if isinstance(model, SupportsMultiModal):
        try:
            language_model = model.get_language_model()
        except NotImplementedError:
            return None
        return language_model if is_mixture_of_experts(language_model) else None
    return None

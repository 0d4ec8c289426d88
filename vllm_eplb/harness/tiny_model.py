"""Build small MoE checkpoints locally (no model hub): random weights, a router skewed so
a few experts per layer are hot, a tokenizer built with `tokenizers`. The Qwen3-MoE one is
the default model of the README's serve command and of the end-to-end tests; the others
(ARCHITECTURES) make the architecture matrix (tests/test_e2e_architectures.py).

    python -m vllm_eplb.harness.tiny_model OUT_DIR [--arch qwen3_moe] [--experts 16 --layers 4 --hot 3]

How the skew is made: see `skew_routers` (the router rows of a few experts per layer
are pulled towards the direction every token's hidden state shares).
"""

from __future__ import annotations

import argparse
import json
import os

WORDS = (
    "the of and to in is was for on that with as by at from his her they this be are an or which "
    "one had not but were all their has been there who would can more when will if no out so said what up "
    "its about into than them only some could other time new these two may first then do any like my now "
    "over such our man me even most made after also did many before must through back years where much your "
    "way well down should because each just those people how too little state good very make world still own "
    "see men work long get here between both life being under never day same another know while last might us "
    "great old year off come since against go came right used take three expert model token layer rank load"
).split()


def build_tokenizer(out_dir: str, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(40)) for i in range(400)]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    fast.save_pretrained(out_dir)


def moe_routers(layer, experts: int) -> list:
    """(router module, its weight) of each MoE block of a decoder layer: the child named gate or
    router (or a router's `proj`, Gemma 4's) whose weight scores every expert from the module's
    input; none in a dense layer."""
    import torch

    out = []
    for name, mod in layer.named_modules():
        parent, _, leaf = name.rpartition(".")
        w = getattr(mod, "weight", None)
        named = leaf in ("gate", "router") or (leaf == "proj" and parent.rpartition(".")[2] == "router")
        if named and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == experts:
            out.append((mod, w))
    return out


def skew_routers(model, experts: int, hot: int, skew: float, vocab_size: int, seed: int, shared: float = 1.0) -> None:
    """Make `hot` experts per MoE layer receive most tokens (dense layers are left alone).

    Layer by layer (each change moves the inputs of the layers after it), the router's
    inputs are recorded on random token sequences; their mean direction u is
    shared by nearly every token, so adding a multiple of u to the router rows of the
    hot experts makes most tokens pick them. The hot experts come from the lower half
    of the ids, which vLLM's default layout places on the first ranks."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # a direction every token embedding carries, so every token's residual stream does
        emb = model.get_input_embeddings().weight
        v = torch.randn(emb.shape[1], generator=g)
        emb.add_(v / v.norm() * emb.norm(dim=1, keepdim=True).mean() * shared)
    calib = torch.randint(4, vocab_size, (16, 24), generator=g)
    for layer in model.model.layers:
        for router, gate in moe_routers(layer, experts):
            seen = []
            handle = router.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
            with torch.no_grad():
                model(calib)
            handle.remove()
            inputs = torch.cat(seen)
            u = inputs.mean(dim=0)
            u = u / u.norm()
            # project the typical input on u so the pull is scaled to what tokens carry
            reach = (inputs @ u).mean().abs().clamp(min=1e-3)
            with torch.no_grad():
                hot_ids = torch.randperm(max(hot, experts // 2), generator=g)[:hot]
                logit_scale = (inputs @ gate.T).std()
                for rank, e in enumerate(hot_ids.tolist()):
                    gate[e] += u * (skew * logit_scale / reach) / (rank + 1)


def _qwen3_moe(hidden, experts, top_k, moe_intermediate):
    return dict(
        intermediate_size=hidden * 2, moe_intermediate_size=moe_intermediate, head_dim=hidden // 4,
        num_experts=experts, num_local_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True,
        decoder_sparse_step=1,
    )


def _qwen2_moe(hidden, experts, top_k, moe_intermediate):
    # a shared expert beside the routed ones; layer 1 is a dense MLP between MoE layers
    return dict(
        intermediate_size=hidden * 2, moe_intermediate_size=moe_intermediate, shared_expert_intermediate_size=hidden,
        num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1],
    )


def _mixtral(hidden, experts, top_k, moe_intermediate):
    return dict(intermediate_size=moe_intermediate, head_dim=hidden // 4, num_local_experts=experts, num_experts_per_tok=top_k)


def _olmoe(hidden, experts, top_k, moe_intermediate):
    return dict(intermediate_size=moe_intermediate, num_experts=experts, num_experts_per_tok=top_k)


def _deepseek_v2(hidden, experts, top_k, moe_intermediate):
    # MLA with the latent size vLLM's CPU MLA kernel is built for (kv_lora_rank 512 + rope 64),
    # a shared expert, layer 0 dense
    return dict(
        intermediate_size=hidden * 2, moe_intermediate_size=moe_intermediate, n_routed_experts=experts,
        n_shared_experts=1, num_experts_per_tok=top_k, first_k_dense_replace=1, moe_layer_freq=1,
        kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32,
        num_key_value_heads=4, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
        norm_topk_prob=False,
    )


def _deepseek_v3(hidden, experts, top_k, moe_intermediate):
    # DeepSeek-V3's routing (DeepSeek-R1 and Kimi K2 share the class): sigmoid scores plus a
    # per-expert correction bias (noaux_tc), top-k within the best groups; MLA as _deepseek_v2
    return dict(
        _deepseek_v2(hidden, experts, top_k, moe_intermediate), topk_method="noaux_tc", scoring_func="sigmoid",
        n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
    )


def _glm4_moe(hidden, experts, top_k, moe_intermediate):
    # GLM-4.5's MoE: DeepSeek-V3's routing (sigmoid, correction bias, groups) under GQA, a shared expert, layer 0 dense
    return dict(
        intermediate_size=hidden * 2, moe_intermediate_size=moe_intermediate, n_routed_experts=experts,
        n_shared_experts=1, num_experts_per_tok=top_k, first_k_dense_replace=1, head_dim=hidden // 4,
        n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=True, partial_rotary_factor=0.5,
    )


def _phimoe(hidden, experts, top_k, moe_intermediate):
    # Phi-3.5-MoE: sparsemixer routing (vLLM's custom routing function); vLLM's class always has
    # attention and lm_head biases, so the checkpoint carries them
    return dict(
        intermediate_size=moe_intermediate, head_dim=hidden // 4, num_local_experts=experts, num_experts_per_tok=top_k,
        attention_bias=True, lm_head_bias=True,
    )


def _granitemoe(hidden, experts, top_k, moe_intermediate):
    return dict(intermediate_size=moe_intermediate, num_local_experts=experts, num_experts_per_tok=top_k)


def _ernie45_moe(hidden, experts, top_k, moe_intermediate):
    # ERNIE-4.5 MoE: layer 0 dense
    return dict(
        intermediate_size=hidden * 2, moe_intermediate_size=moe_intermediate, moe_num_experts=experts, moe_k=top_k,
        moe_layer_start_index=1, moe_num_shared_experts=0, head_dim=hidden // 4, use_bias=False,
    )


def _lfm2_moe(hidden, experts, top_k, moe_intermediate):
    # LFM2-MoE: short convolutions between attention layers, a routing bias, layer 0 dense
    return dict(
        intermediate_size=hidden * 2, moe_intermediate_size=moe_intermediate, num_experts=experts,
        num_experts_per_tok=top_k, num_dense_layers=1, use_expert_bias=True, norm_topk_prob=True,
        layer_types=lambda n: ["conv", "full_attention"] * (n // 2) + ["conv"] * (n % 2),
    )


def _gemma4(hidden, experts, top_k, moe_intermediate):
    # Gemma 4's MoE (26B-A4B): in every layer a dense MLP beside the routed experts; sliding-window
    # attention with a full-attention layer every few
    return dict(
        intermediate_size=hidden * 2, head_dim=hidden // 4, enable_moe_block=True, num_experts=experts,
        top_k_experts=top_k, moe_intermediate_size=moe_intermediate, sliding_window=64,
        hidden_size_per_layer_input=0, layer_types=lambda n: ["sliding_attention", "full_attention"] * (n // 2)
        + ["sliding_attention"] * (n % 2),
    )


def _glm4_moe_lite(hidden, experts, top_k, moe_intermediate):
    # GLM-4.7-Flash: DeepSeek-V3's MLA and routing under GLM's names, layer 0 dense
    return dict(
        _deepseek_v3(hidden, experts, top_k, moe_intermediate), n_group=1, topk_group=1, q_lora_rank=None,
        mlp_layer_types=lambda n: ["dense"] + ["sparse"] * (n - 1),
    )


def _nemotron_h(hidden, experts, top_k, moe_intermediate):
    # Nemotron 3 Nano: Mamba-2 layers, MoE layers (sigmoid routing with a correction bias, a shared
    # expert) and an attention layer
    return dict(
        intermediate_size=hidden * 2, head_dim=hidden // 4, n_routed_experts=experts, num_experts_per_tok=top_k,
        moe_intermediate_size=moe_intermediate, moe_shared_expert_intermediate_size=hidden, n_shared_experts=1,
        n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0, mamba_num_heads=8,
        mamba_head_dim=hidden // 8, ssm_state_size=32, n_groups=1, chunk_size=64,
        layers_block_type=lambda n: (["mamba", "moe", "attention", "moe"] * n)[:n],
    )


def _qwen3_5_moe(hidden, experts, top_k, moe_intermediate):
    # Qwen3.5's MoE: gated delta-net linear attention in three layers of four, gated attention in
    # the fourth, a shared expert beside the routed ones
    return dict(
        moe_intermediate_size=moe_intermediate, shared_expert_intermediate_size=hidden, num_experts=experts,
        num_experts_per_tok=top_k, head_dim=hidden // 4, linear_key_head_dim=hidden // 4,
        linear_value_head_dim=hidden // 4, linear_num_key_heads=2, linear_num_value_heads=4,
        layer_types=lambda n: (["linear_attention"] * 3 + ["full_attention"]) * (n // 4)
        + ["linear_attention"] * (n % 4),
    )


def _gpt_oss(hidden, experts, top_k, moe_intermediate):
    return dict(intermediate_size=moe_intermediate, head_dim=hidden // 4, num_local_experts=experts, num_experts_per_tok=top_k)


def _llama4(hidden, experts, top_k, moe_intermediate):
    # every second layer MoE (with a shared expert), the others dense; top-1 routing, the
    # only one vLLM's Llama-4 (router weight applied on the input) runs
    return dict(
        intermediate_size=moe_intermediate, intermediate_size_mlp=hidden * 2, head_dim=hidden // 4,
        num_local_experts=experts, num_experts_per_tok=1, interleave_moe_layer_step=2,
    )


# name -> (transformers config class, model class, the config's own keys)
ARCHITECTURES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", _qwen3_moe),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", _qwen2_moe),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", _mixtral),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", _olmoe),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", _deepseek_v2),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", _deepseek_v3),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", _glm4_moe),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", _gpt_oss),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", _phimoe),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", _granitemoe),
    "ernie45_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", _ernie45_moe),
    "lfm2_moe": ("Lfm2MoeConfig", "Lfm2MoeForCausalLM", _lfm2_moe),
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM", _llama4),
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM", _gemma4),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM", _glm4_moe_lite),
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM", _nemotron_h),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", _qwen3_5_moe),
}

# the class name vLLM registers, where it differs from transformers' (which vLLM would serve
# through its Transformers backend instead of its own implementation)
VLLM_CLASS = {"phimoe": "PhiMoEForCausalLM"}


def build(
    out_dir: str,
    layers: int = 4,
    experts: int = 16,
    top_k: int = 2,
    hidden: int = 128,
    moe_intermediate: int = 64,
    hot: int = 3,
    skew: float = 3.0,
    vocab: int = 512,
    seed: int = 0,
    arch: str = "qwen3_moe",
    *,
    config: dict | None = None,
    skew_model=None,
    dtype: str = "float32",
    device: str | None = None,
) -> str:
    """A checkpoint of `arch` in out_dir: the tokenizer, the config, random weights whose
    routers `skew_routers` skews (or `skew_model(model, vocab_size)`, another skew), saved in
    `dtype`. config: keys of the transformers config set over this module's (the serving
    benchmarks' model: benchmarks/serving/model.py); device: where the weights are drawn."""
    import contextlib

    import torch
    import transformers

    config_class, model_class, arch_keys = ARCHITECTURES[arch]
    os.makedirs(out_dir, exist_ok=True)
    build_tokenizer(out_dir, vocab)
    with open(os.path.join(out_dir, "tokenizer_config.json")) as fh:
        vocab_size = max(vocab, len(json.load(fh).get("added_tokens_decoder", {})))
    torch.manual_seed(seed)
    keys = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        torch_dtype="float32",
        # Wider than the usual 0.02: with tiny random weights the greedy output collapses
        # to one repeated token, which would make output comparisons weak.
        initializer_range=0.3,
    )
    # a key given as a function of the layer count (layer types) is resolved here
    own = {k: v(layers) if callable(v) else v for k, v in arch_keys(hidden, experts, top_k, moe_intermediate).items()}
    keys.update(own)
    keys.update(config or {})
    cfg = getattr(transformers, config_class)(**keys)
    with torch.device(device) if device else contextlib.nullcontext():
        model = getattr(transformers, model_class)(cfg).to(torch.float32)
    if skew_model is None:
        skew_routers(model, experts, hot, skew, vocab_size, seed)
    else:
        skew_model(model, vocab_size)
    with torch.no_grad():
        # a trained model's routing correction bias (DeepSeek-V3, GLM-4.5) is not zero: draw one,
        # so a bias read per logical expert is part of what the checks see
        g = torch.Generator().manual_seed(seed + 2)
        for name, buf in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.05)
    model.to(getattr(torch, dtype)).save_pretrained(out_dir, safe_serialization=True)
    # transformers 5 may drop keys it renamed (num_experts for num_local_experts); vLLM
    # reads the model's own names: write them back as given.
    path = os.path.join(out_dir, "config.json")
    with open(path) as fh:
        conf = json.load(fh)
    conf.update({k: keys[k] for k in own if k not in conf})
    conf["architectures"] = [VLLM_CLASS.get(arch, model_class)]  # save_pretrained writes its own class
    with open(path, "w") as fh:
        json.dump(conf, fh, indent=2)
    return out_dir


def new_experts(src_dir: str, out_dir: str, seed: int = 1) -> str:
    """A copy of the checkpoint in src_dir whose routed experts' weights are drawn anew (same
    shapes and scale), everything else (router, attention, embeddings) unchanged: the
    "next training step" of a weight update, routed as before."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src_dir, out_dir, dirs_exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for name in sorted(os.listdir(out_dir)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(out_dir, name)
        tensors = load_file(path)
        for key, t in tensors.items():
            if ".mlp.experts." in key:
                tensors[key] = (torch.randn(t.shape, generator=g) * t.float().std()).to(t.dtype)
        save_file(tensors, path, metadata={"format": "pt"})
    return out_dir


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--arch", choices=sorted(ARCHITECTURES), default="qwen3_moe")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--hot", type=int, default=3, help="hot experts per layer")
    ap.add_argument("--skew", type=float, default=3.0, help="router pull towards the hot experts")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    build(a.out_dir, a.layers, a.experts, a.top_k, a.hidden, hot=a.hot, skew=a.skew, seed=a.seed, arch=a.arch)
    print(a.out_dir)


if __name__ == "__main__":
    main()

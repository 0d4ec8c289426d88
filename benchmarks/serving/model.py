"""The served model, built locally (no hub): a Qwen3-MoE with random weights whose vocabulary is
split into topics. Each topic's tokens carry a direction of their own through the residual stream;
the router rows of a few experts per topic are pulled towards it, and the LM head keeps a topic's
generations in the topic. A load that walks through the topics makes the hot experts drift.

`quantize_fp8` writes the same model as a checkpoint quantized ahead of time (fp8 e4m3 weights with
128 x 128 block scales, the format of DeepSeek-V3's and Qwen3's FP8 releases): the experts'
weights and their block scales are what the balancer moves.
"""

from __future__ import annotations

import json
import os

def build_model(out_dir: str, a) -> str:
    """A Qwen3-MoE with topic-skewed routers (see the module docstring); reused if present."""
    stamp = os.path.join(out_dir, "built.json")
    spec = {k: getattr(a, k) for k in ("layers", "experts", "top_k", "hidden", "moe_intermediate", "groups", "hot", "seed", "dtype")}
    if os.path.exists(stamp) and json.load(open(stamp)) == spec:
        return out_dir
    import torch

    from vllm_eplb.harness.tiny_model import build

    # tiny_model's Qwen3-MoE (tokenizer, config, checkpoint as vLLM reads it), wider: more
    # heads, longer positions, and the topic skew instead of tiny_model's hot experts
    heads = max(4, a.hidden // 128)
    build(
        out_dir, a.layers, a.experts, a.top_k, a.hidden, a.moe_intermediate, vocab=a.vocab, seed=a.seed,
        config=dict(num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), head_dim=a.hidden // heads,
                    max_position_embeddings=4096, initializer_range=0.3 if a.hidden <= 256 else 0.05),
        skew_model=lambda model, vocab: skew_topics(model, a.groups, a.hot, vocab, a.seed),
        dtype=a.dtype, device="cuda" if torch.cuda.is_available() else "cpu",
    )
    json.dump(spec, open(stamp, "w"))
    return out_dir


def topic_range(vocab: int, groups: int, g: int) -> tuple[int, int]:
    """Token ids of topic g: the vocabulary past the 4 special tokens, in equal parts."""
    size = (vocab - 4) // groups
    return 4 + g * size, 4 + (g + 1) * size


def skew_topics(model, groups: int, hot: int, vocab: int, seed: int, strength: float = 3.0) -> None:
    """Topic g's tokens get direction v_g in their embeddings; the LM head rows of its tokens
    lean towards v_g (generations stay in the topic); per layer, the router rows of `hot`
    experts of each topic (different experts per topic) are pulled towards the mean input
    direction of that topic's tokens at that layer, scaled as the router's logits are."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    dirs = torch.linalg.qr(torch.randn(emb.shape[1], groups, generator=g))[0].T.to(emb.device)  # orthonormal
    with torch.no_grad():
        scale = emb.norm(dim=1).mean()
        for t in range(groups):
            lo, hi = topic_range(vocab, groups, t)
            emb[lo:hi] += dirs[t] * scale
            head[lo:hi] += dirs[t] * head.norm(dim=1).mean()
    experts = model.config.num_experts
    perm = torch.randperm(experts, generator=g).tolist()
    calib = {t: torch.randint(*topic_range(vocab, groups, t), (8, 32), generator=g).to(emb.device) for t in range(groups)}
    for layer in model.model.layers:
        seen: dict[int, list] = {}
        for t in range(groups):
            rows = []
            h = layer.mlp.register_forward_hook(lambda mod, args, out: rows.append(args[0].detach().reshape(-1, args[0].shape[-1])))
            with torch.no_grad():
                model(calib[t])
            h.remove()
            seen[t] = torch.cat(rows)
        with torch.no_grad():
            gate = layer.mlp.gate.weight
            for t in range(groups):
                x = seen[t]
                u = x.mean(dim=0)
                u = u / u.norm()
                reach = (x @ u).mean().abs().clamp(min=1e-3)
                logit_scale = (x @ gate.T).std()
                for i in range(hot):
                    e = perm[(t * hot + i) % experts]
                    gate[e] += u * (strength * logit_scale / reach) / (i + 1)


# --------------------------------------------------------------------------- load


FP8_BLOCK = 128


def quantize_fp8(src_dir: str, out_dir: str) -> str:
    """`src_dir`'s checkpoint with every linear layer but the routers and the LM head in fp8
    e4m3 (`weight`) with one float32 scale per 128 x 128 block (`weight_scale_inv`: dequantized
    = weight x scale), and the `quantization_config` vLLM's fp8 method reads. Reused if present."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    stamp = os.path.join(out_dir, "quantized_from.json")
    if os.path.exists(stamp) and json.load(open(stamp)) == {"src": os.path.realpath(src_dir)}:
        return out_dir
    shutil.copytree(src_dir, out_dir, dirs_exist_ok=True)
    fmax = torch.finfo(torch.float8_e4m3fn).max
    ignored = ["lm_head"]
    for name in sorted(os.listdir(out_dir)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(out_dir, name)
        tensors, out = load_file(path), {}
        for key, w in tensors.items():
            module = key[: -len(".weight")] if key.endswith(".weight") else None
            if module is None or w.dim() != 2 or "embed_tokens" in key or module == "lm_head" or module.endswith(".mlp.gate"):
                if module is not None and module.endswith(".mlp.gate"):
                    ignored.append(module)
                out[key] = w
                continue
            rows, cols = w.shape
            if rows % FP8_BLOCK or cols % FP8_BLOCK:
                raise SystemExit(f"quantize_fp8: {key} is {tuple(w.shape)}; 128 x 128 block scales need every linear "
                                 "layer's sides in multiples of 128 (--hidden, --moe-intermediate)")
            blocks = w.float().reshape(rows // FP8_BLOCK, FP8_BLOCK, cols // FP8_BLOCK, FP8_BLOCK)
            scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / fmax
            q = (blocks / scale[:, None, :, None]).clamp(-fmax, fmax).reshape(rows, cols).to(torch.float8_e4m3fn)
            out[key], out[module + ".weight_scale_inv"] = q.contiguous(), scale.contiguous()
        save_file(out, path, metadata={"format": "pt"})
    conf_path = os.path.join(out_dir, "config.json")
    conf = json.load(open(conf_path))
    conf["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                   "weight_block_size": [FP8_BLOCK, FP8_BLOCK], "ignored_layers": sorted(set(ignored))}
    json.dump(conf, open(conf_path, "w"), indent=2)
    json.dump({"src": os.path.realpath(src_dir)}, open(stamp, "w"))
    return out_dir


def redrawn_experts(src_dir: str, out_dir: str, seed: int = 1) -> str:
    """The checkpoint with its routed experts drawn anew (a trainer's next step), for reloads."""
    from vllm_eplb.harness.tiny_model import new_experts

    if not os.path.exists(os.path.join(out_dir, "config.json")):
        new_experts(src_dir, out_dir, seed)
    return out_dir

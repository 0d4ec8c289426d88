"""Build a small Qwen3-MoE checkpoint locally (no model hub): random weights, a
router skewed so a few experts per layer are hot, a tokenizer built with
`tokenizers`. Used as the default model of the README's serve command and by the
end-to-end tests.

    python -m vllm_eplb.integration.tiny_model OUT_DIR [--experts 16 --layers 4 --hot 3]

How the skew is made: every token embedding gets a shared offset vector v, so the
residual stream of every token carries v; in each layer the router rows of the
`hot` chosen experts get a component along v, so most tokens score those experts
highest. Which experts are hot differs per layer; they come from the lower half of
the expert ids, which vLLM's default layout places on the first ranks.
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


def build(
    out_dir: str,
    layers: int = 4,
    experts: int = 16,
    top_k: int = 2,
    hidden: int = 128,
    moe_intermediate: int = 64,
    hot: int = 3,
    skew: float = 8.0,
    vocab: int = 512,
    seed: int = 0,
) -> str:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    build_tokenizer(out_dir, vocab)
    with open(os.path.join(out_dir, "tokenizer_config.json")) as fh:
        vocab_size = max(vocab, len(json.load(fh).get("added_tokens_decoder", {})))
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        moe_intermediate_size=moe_intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        num_experts=experts,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
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
    model = Qwen3MoeForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():
        v = torch.randn(hidden)
        v = v / v.norm()
        emb = model.model.embed_tokens.weight
        emb.add_(v * emb.norm(dim=1, keepdim=True).mean())  # every token carries v
        g = torch.Generator().manual_seed(seed + 1)
        for layer in model.model.layers:
            gate = layer.mlp.gate.weight  # (experts, hidden)
            # hot experts from the lower half of the ids: vLLM's default layout puts those on
            # the first ranks, so serving starts unbalanced and the balancer has work to do
            hot_ids = torch.randperm(max(hot, experts // 2), generator=g)[:hot]
            scale = gate.norm(dim=1).mean() * skew
            for rank, e in enumerate(hot_ids.tolist()):
                gate[e] += v * scale / (rank + 1)
    model.config.architectures = ["Qwen3MoeForCausalLM"]
    model.save_pretrained(out_dir, safe_serialization=True)
    # transformers 5 writes num_local_experts; vLLM reads num_experts: keep both.
    path = os.path.join(out_dir, "config.json")
    with open(path) as fh:
        conf = json.load(fh)
    conf["num_experts"] = experts
    conf["num_local_experts"] = experts
    with open(path, "w") as fh:
        json.dump(conf, fh, indent=2)
    return out_dir


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--hot", type=int, default=3, help="hot experts per layer")
    ap.add_argument("--skew", type=float, default=8.0, help="router pull towards the hot experts")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    build(a.out_dir, a.layers, a.experts, a.top_k, a.hidden, hot=a.hot, skew=a.skew, seed=a.seed)
    print(a.out_dir)


if __name__ == "__main__":
    main()

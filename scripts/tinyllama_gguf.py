#!/usr/bin/env python3
"""Writes an F16 GGUF of TinyLlama-1.1B's shape with random weights, for the CPU speed comparison
against llama.cpp on a model too big for the caches (the second table of scripts/bench-llama-cpp.sh).

The shape is awq-run's `--dummy-weights --config tinyllama-1.1b` preset: hidden 2048,
intermediate 5632, 22 layers, 32 query heads and 4 KV heads, vocabulary 32000, untied head.
The vocabulary is a made-up SentencePiece one (llama.cpp needs one to load a model; llama-bench
feeds random token ids). Weights are N(0, 0.02²) in f16, norms 1; their values do not change
either engine's speed.

    scripts/tinyllama_gguf.py OUT.gguf
"""
import sys

import gguf
import numpy as np

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 2048, 5632, 22, 32, 4, 32000
HEAD_DIM = HIDDEN // HEADS


def main(path: str) -> None:
    rng = np.random.default_rng(0)

    def weight(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tinyllama-shaped random")
    w.add_context_length(2048)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    # <unk>, <s>, </s>, the 256 byte tokens, then made-up pieces.
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    tokens += [f"\u2581t{i}" for i in range(VOCAB - len(tokens))]
    types += [gguf.TokenType.NORMAL] * (VOCAB - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(VOCAB)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    ones = np.ones(HIDDEN, dtype=np.float32)
    w.add_tensor("token_embd.weight", weight(VOCAB, HIDDEN))
    for i in range(LAYERS):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", ones)
        w.add_tensor(b + "attn_q.weight", weight(HIDDEN, HIDDEN))
        w.add_tensor(b + "attn_k.weight", weight(KV_HEADS * HEAD_DIM, HIDDEN))
        w.add_tensor(b + "attn_v.weight", weight(KV_HEADS * HEAD_DIM, HIDDEN))
        w.add_tensor(b + "attn_output.weight", weight(HIDDEN, HIDDEN))
        w.add_tensor(b + "ffn_norm.weight", ones)
        w.add_tensor(b + "ffn_gate.weight", weight(INTER, HIDDEN))
        w.add_tensor(b + "ffn_up.weight", weight(INTER, HIDDEN))
        w.add_tensor(b + "ffn_down.weight", weight(HIDDEN, INTER))
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", weight(VOCAB, HIDDEN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])

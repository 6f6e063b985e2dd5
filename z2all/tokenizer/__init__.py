"""Byte-level BPE tokenizer: split pattern (pretokenize), trainers (bpe), `z2all tokenizer train` (train),
the transformers-compatible directory and special-token policy (hf, tokenization_z2all), `z2all tokenizer
eval` (evaluate). Trained tokenizers are used through `tokenizers` / `transformers`, loaded from disk.
"""

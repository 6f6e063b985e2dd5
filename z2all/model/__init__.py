"""The Z2all model (Llama-2 architecture) and what surrounds it:

    config.py     ModelConfig + named presets (tiny, 125m, 350m, 1b, 1.7b, llama2-7b)
    llama.py      Z2all (ops through the z2all.ops switch), KVCache, save_model / load_model
    hf_compat.py  to/from transformers LlamaForCausalLM; `z2all export hf`
    generate.py   KV-cache sampling, streaming, batched prompts; `z2all generate`

Nothing is imported here, so `from z2all.model.config import ModelConfig` does not import torch.
"""

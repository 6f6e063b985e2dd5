"""llm-zero2all: the whole LLM stack written from scratch.

Raw corpora -> unified shards -> byte-level BPE tokenizer -> token files -> a Llama-2-architecture model
("Z2all") with hand-written Triton kernels -> pretraining -> generation and Hugging Face export.
Run `z2all --help` (or `python -m z2all --help`) for the stages.
"""

__version__ = "0.1.0"

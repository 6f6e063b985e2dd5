"""Training: the loop every objective shares (`loop.py`), pretraining as one objective (`pretrain.py`,
`z2all train`), distributed wrapping (`distributed.py`: torchrun
environment, DDP / FSDP2, communication hooks), exact-resume checkpoints (`checkpoint.py`), AdamW groups and
the LR schedule (`optim.py`), FLOPs/MFU/throughput and metric sinks (`metrics.py`) and curves (`plot.py`,
`z2all plot RUN`).

Layering: train/ imports data/ (the token loader) and model/ (the Z2all model); neither imports train/.
"""

"""Evaluation (`z2all eval`): what a user comparing checkpoints, tokenizers or their model with others
needs. Bits per byte per domain, multiple-choice suites scored as lm-evaluation-harness scores them, and
generative exact match, on our checkpoints and on any Hugging Face Llama directory.

    formats.py  loaders for C-Eval / CMMLU / MMLU csv, HellaSwag / ARC / generic jsonl, few-shot prompts
    tasks.py    tasks from our own corpora: held-out documents, the "which continuation?" set
    score.py    the numbers: load_lm, bpb_per_domain, loglikelihoods (shared context), exact_match
    run.py      the command: Config, run(cfg), tables, demo_report() for `make demo`
    intrain.py  the held-out scores of the training loop's evaluations (--eval.bpb_max_tokens, ...)

Layering: eval reads model checkpoints, tokenizer directories and `data tokenize` outputs from disk; it
knows nothing of training or serving (the training loop calls intrain.py with its model, not the reverse).
"""

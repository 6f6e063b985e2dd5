"""`z2all` with the `sft` stage registered (when cli.py does not list it yet), for the SFT tests' subprocesses:
    python tests/train/sft_cli.py sft --init ... ;  torchrun --nproc_per_node=2 tests/train/sft_cli.py sft ..."""

import sys

from z2all import cli

if "sft" not in cli.STAGES:
    cli.STAGES["sft"] = cli.Command("fine-tune a pretrained checkpoint on chat data (packing, loss on assistant "
                                    "tokens)", "z2all.train.sft")

if __name__ == "__main__":
    sys.exit(cli.main())

"""`z2all` with the `dpo` and `data prefs` stages registered (when cli.py does not list them yet), for the DPO
tests' subprocesses: python tests/train/dpo_cli.py dpo --init ... ; torchrun ... tests/train/dpo_cli.py dpo ..."""

import sys

from z2all import cli

if "dpo" not in cli.STAGES:
    cli.STAGES["dpo"] = cli.Command("align a checkpoint on preference pairs (DPO / IPO, optional LoRA)",
                                    "z2all.train.dpo")
if "prefs" not in cli.STAGES["data"][1]:
    cli.STAGES["data"][1]["prefs"] = cli.Command("preference pairs + tokenizer -> DPO token, mask and pair files",
                                                 "z2all.data.prefs")
if "sft" not in cli.STAGES:
    cli.STAGES["sft"] = cli.Command("fine-tune a pretrained checkpoint on chat data", "z2all.train.sft")

if __name__ == "__main__":
    sys.exit(cli.main())

"""Train the DiT of an experiment config; the same as ``vidiff train --model dit``.

    python experiments/train_dit.py --config world_tiny [--config.dit_train.steps=100 ...]

Checkpoints, metrics and samples go to ``<workdir>/dit``, the exported model to ``<workdir>/export``.
Running the same command again resumes from the last checkpoint.
"""
import sys

from vidiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "--model", "dit", *sys.argv[1:]]))

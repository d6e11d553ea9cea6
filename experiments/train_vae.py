"""Train the VAE of an experiment config; the same as ``vidiff train --model vae``.

    python experiments/train_vae.py --config world_tiny [--config.vae_train.steps=100 ...]

Checkpoints, metrics and samples go to ``<workdir>/vae``, the exported model to ``<workdir>/export``.
Running the same command again resumes from the last checkpoint.
"""
import sys

from vidiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "--model", "vae", *sys.argv[1:]]))

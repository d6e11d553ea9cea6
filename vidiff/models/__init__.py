"""The networks: causal video VAE (``vae``), spacetime DiT (``dit``), frozen text encoders (``text``)."""

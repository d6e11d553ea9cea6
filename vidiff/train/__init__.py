"""Training: config files (``config``) and command-line overrides (``overrides``), checks made before
anything compiles (``preflight``), optimizer and EMA (``optimizer``), the sharded train state and step
(``state``), what each model trains on (``tasks``; latents prepared ahead: ``precompute``, ``latent_cache``),
orbax checkpoints (``checkpoint``), metrics, the loop (``loop``) and how a run stops early (``stopping``),
step profiles (``profile``), and ``vidiff train`` itself (``command``)."""

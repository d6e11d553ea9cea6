"""Training: config loading (``config``), optimizer and EMA (``optimizer``), the sharded
train state and step (``state``), what each model trains on (``tasks``), orbax
checkpoints (``checkpoint``), exported models (``export``), metrics and the loop (``loop``)."""

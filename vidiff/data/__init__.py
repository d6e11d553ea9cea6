"""vidiff.data: captioned clips -> batches, with Grain.

Modules:
  schema      the record schema and the ``VDR1`` byte format of prepared shards
  sources     video folder (+ manifest), ArrayRecord shards, TFDS, captioned world
  transforms  buckets, temporal window, resize + crop, caption dropout, tokenise hook
  batching    record batching and bucket-wise batching with exact resume
  skips       counting, logging and limiting bad input
  config      ``DataConfig`` (what experiments keep under ``config.data``)
  registry    ``data.source`` names: the built-in sources and ``register_source`` for your own
  pipeline    ``make_pipeline`` / ``record_stream``: config -> grain IterDataset
  prepare     video folder -> ArrayRecord shards (``prepare_shards``; the ``vidiff prepare`` command is
              ``vidiff.train.precompute``, which can add VAE latents)
  world       the built-in procedural captioned world

Names below are imported on first use, so ``import vidiff.data.world`` (and
``vidiff --help``) does not pay for grain.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "DataConfig": "vidiff.data.config",
    "register_source": "vidiff.data.registry",
    "make_pipeline": "vidiff.data.pipeline",
    "record_stream": "vidiff.data.pipeline",
    "make_ledger": "vidiff.data.pipeline",
    "SkipLedger": "vidiff.data.skips",
    "Skip": "vidiff.data.skips",
    "make_record": "vidiff.data.schema",
    "encode_record": "vidiff.data.schema",
    "decode_record": "vidiff.data.schema",
    "read_manifest": "vidiff.data.sources",
    "ManifestRow": "vidiff.data.sources",
    "ArrayRecordSource": "vidiff.data.shards",
    "TfdsSource": "vidiff.data.sources",
    "BucketBatch": "vidiff.data.batching",
    "batch_records": "vidiff.data.batching",
    "prepare_shards": "vidiff.data.prepare",
    "augment_shards": "vidiff.data.prepare",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vidiff.data' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)

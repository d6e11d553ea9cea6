"""``vidiff train --config NAME|FILE --model vae|dit [--mesh SPEC] [--config.field=value ...]``."""
from __future__ import annotations

import json
import sys

ACCEPTS_CONFIG_OVERRIDES = True


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="experiment config: a shipped one's name (world_tiny, "
                        "real_tiny: vidiff/configs/) or a config file's path")
    parser.add_argument("--model", required=True, choices=("vae", "dit"), help="which network to train")
    parser.add_argument("--mesh", default=None, help="replaces the config's mesh sizes: a preset (dp, fsdp, "
                        "fsdp_tensor, fsdp_context), 'd,f,t,c' sizes or 'fsdp=4,context=2'")
    parser.epilog = "Override any config field with --config.<path>=<value>, e.g. --config.vae_train.steps=200."


def run(args) -> int:
    from vidiff.train.config import load_config, set_mesh
    from vidiff.train.loop import train
    from vidiff.data.schema import json_safe

    config = load_config(args.config, args.overrides)
    if args.mesh is not None:
        set_mesh(config, args.mesh)
    # Log lines on stderr: stdout holds the summary alone, for whatever reads it.
    summary = train(config, args.model, log=lambda *a, **k: print(*a, **k, file=sys.stderr, flush=True))
    print(json.dumps(json_safe(summary), allow_nan=False))  # a NaN loss is null: the line stays valid JSON
    return 0

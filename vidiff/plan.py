"""``vidiff plan``: will this training config fit, on how many devices, at which clip length?

Compiles the real train step (``make_train_step`` + ``jit_train_step``: loss, gradients,
AdamW, EMA, donated state) ahead of time against abstract inputs (``jax.ShapeDtypeStruct``
with shardings: nothing is allocated) and prints, per device: parameters, optimizer state,
EMA, the batch, frozen inputs (the VAE a DiT run holds, which encodes each batch in the step with
``dit_train.latents='on_the_fly'``), activations (XLA's temporaries) and the peak, in GiB. A DiT's device 0
also holds the frozen text encoder and, with ``dit_train.latents='cached'``, the latent cache's VAE: its
"device 0 peak" adds them, and whether that fits ``--device-memory`` is the verdict. One row per
``--tokens`` x ``--remat`` combination::

    vidiff plan --config world_tiny --preset XL --mesh fsdp --devices 8 \\
        --tokens 4096,16384 --remat none,block --device-memory 80

Devices: the first ``--devices`` real devices when the machine has them (the real compiler, and the
config's step as it would train there, CPUs included), otherwise the plan re-runs itself on that many
virtual CPU devices, which stand in for others (a fake topology; the CPU compiler's fusion and buffer
choices differ from a GPU's, so read the numbers as estimates). On those, ``--attention chunked`` (the
default there) stands in for cuDNN flash attention's linear memory (``xla`` materialises the full
attention logits), and scanned blocks are the default (``--no-scan`` plans the unrolled layout):
XLA:CPU keeps an order of magnitude more of an unrolled, rematerialised step's activations than a GPU
does. A config that asks for ``cudnn`` plans ``chunked`` on any CPU. The ``blocks`` column says which
layout was compiled, and the config's when it differs.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import subprocess
import sys
import time

ACCEPTS_CONFIG_OVERRIDES = True
_CHILD = "VIDIFF_PLAN_VIRTUAL_DEVICES"  # set in the re-run on virtual CPU devices: their count
GiB = 2**30
# The flags that shape only the DiT's step (its row would be the same with or without them for the VAE).
_DIT_FLAGS = ("tokens", "remat", "preset", "attention", "dtype", "scan", "text_dim")


def add_arguments(parser) -> None:
    """Flags of ``vidiff plan``."""
    parser.add_argument("--config", required=True, help="experiment config: a shipped one's name (world_tiny, "
                        "real_tiny: vidiff/configs/) or a config file's path")
    parser.add_argument("--model", default="dit", choices=("dit", "vae"), help="which network's train step")
    parser.add_argument("--mesh", default=None, help="preset (dp, fsdp, fsdp_tensor, fsdp_context), 'd,f,t,c' "
                        "sizes or 'fsdp=4,context=2' (default: the config's mesh section)")
    parser.add_argument("--devices", type=int, default=None, help="devices to plan for (default: this machine's)")
    parser.add_argument("--device-memory", type=float, default=None, help="GiB per device; adds a 'fits' column")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default data.batch_size)")
    parser.add_argument("--tokens", default=None, help="comma-separated DiT sequence lengths (spacetime tokens), "
                        "each a latent of square frames (vidiff.models.patches.latent_shape_for_tokens: 4096 -> "
                        "16x32x32 with patch 1,2,2); default: the config's clip")
    parser.add_argument("--remat", default=None,
                        help="comma-separated DiT remat policies (none, norms, block, attention, dots)")
    parser.add_argument("--preset", default=None, help="DiT preset (tiny ... XL, 1.5B) instead of the config's "
                        "preset and overrides")
    parser.add_argument("--attention", default=None, help="DiT attention_impl: xla, cudnn, chunked, ring, ulysses "
                        "(default: the config's; 'chunked' for cudnn on a CPU, and for the config's auto on "
                        "virtual CPU devices standing in for more than this machine has)")
    parser.add_argument("--dtype", default=None, help="DiT compute dtype (float32, bfloat16)")
    parser.add_argument("--scan", action=argparse.BooleanOptionalAction, default=None,
                        help="scan the DiT blocks, or not (default: the config's layout; scanned on virtual CPU "
                        "devices standing in for more than this machine has, whose unscanned plans keep far more "
                        "activations than a GPU's)")
    parser.add_argument("--text-dim", type=int, default=None, help="text-encoder width the DiT takes, pooled vector "
                        "too (default: the config's text.encoder's widths, read from its config.json)")
    parser.epilog = "Override any config field with --config.<path>=<value>."


def run(args) -> int:
    """Print the per-device memory table; more devices than this machine has re-runs on virtual CPU devices."""
    _check_flags(args)
    import jax

    wanted = args.devices or jax.device_count()
    if wanted > jax.device_count():
        return _rerun_on_virtual_cpus(args, wanted)
    rows = plan(args, jax.devices()[:wanted])
    print(format_table(rows, args.device_memory))
    return 0


def _flag(dest: str) -> str:
    """The command-line spelling of an argparse destination: ``text_dim`` -> ``--text-dim``."""
    return f"--{dest.replace('_', '-')}"


def _check_flags(args) -> None:
    """Numbers that would otherwise mean "default" (0) or fail deep in a compile (negative), named up front."""
    for flag in ("devices", "batch", "text_dim"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"{_flag(flag)}={getattr(args, flag)} must be at least 1")
    if args.device_memory is not None and not args.device_memory > 0:
        raise ValueError(f"--device-memory={args.device_memory} must be a positive number of GiB")
    if args.model == "vae":
        dit_only = [_flag(flag) for flag in _DIT_FLAGS if getattr(args, flag) is not None]
        if dit_only:
            raise ValueError(f"{', '.join(dit_only)} set the DiT's step, not the VAE's; drop them with --model vae "
                             "(the VAE's own fields are --config.vae.overrides.<field>=...)")
    _token_counts(args.tokens)


def _rerun_on_virtual_cpus(args, devices: int) -> int:
    """The same plan in a child process with ``devices`` virtual CPU devices (XLA fixes the count at start-up)."""
    if os.environ.get(_CHILD):
        raise ValueError(f"--devices {devices}: only {os.environ[_CHILD]} virtual CPU devices came up")
    argv = [sys.executable, "-m", "vidiff.cli", "plan", "--config", args.config, "--model", args.model,
            "--devices", str(devices)]
    for flag in ("mesh", "device_memory", "batch", "tokens", "remat", "preset", "attention", "dtype", "text_dim"):
        if getattr(args, flag) is not None:
            argv += [_flag(flag), str(getattr(args, flag))]
    argv += ([] if args.scan is None else ["--scan" if args.scan else "--no-scan"]) + list(args.overrides)
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags, _CHILD: str(devices)}
    print(f"planning on {devices} virtual CPU devices (this machine has fewer)", file=sys.stderr, flush=True)
    return subprocess.call(argv, env=env)


def plan(args, devices) -> list[dict]:
    """Compile the train step for each (tokens, remat) asked for; one dict of per-device bytes per row."""
    import jax

    from vidiff import parallel
    from vidiff.models.patches import token_count
    from vidiff.train.config import check_text_encoder, for_stage, load_config

    config = for_stage(load_config(args.config, args.overrides), args.model)
    if args.model == "dit":  # as vidiff train checks it: the config's field named, before its widths are read
        check_text_encoder(config)
    mesh = parallel.mesh_from_config(args.mesh or config.mesh, devices=devices)
    batch = _global_batch(config, args, mesh)
    if args.model == "vae":
        *step, networks = _vae_step(config, mesh, batch)
        return [_compile_row(config, "vae", mesh, *step, dict(model="vae"), networks=networks)]
    on_cpu = jax.default_backend() == "cpu"
    rows = []
    for tokens in _token_counts(args.tokens) or [None]:
        for remat in args.remat.split(",") if args.remat else [None]:
            cfg, latent = _dit_config(config, args, tokens, remat, on_cpu, _stands_in())
            label = dict(model=f"dit {args.preset or config.dit.preset}", tokens=token_count(latent, cfg.patch),
                         latent="x".join(map(str, latent)), remat=cfg.remat_policy, attention=cfg.attention_impl,
                         blocks=_layout(cfg.scan_blocks, _configured_scan(config, args)))
            row = _compile_row(config, "dit", mesh, *_dit_step(config, cfg, mesh, batch, latent), label)
            rows.append(_with_device0(row, config))
    return rows


def _global_batch(config, args, mesh) -> int:
    """``--batch`` or ``data.batch_size``, refused as ``vidiff train`` refuses it."""
    from vidiff.train.config import check_batch_split

    batch = args.batch or int(config.data.batch_size)
    check_batch_split(batch, mesh.shape["data"] * mesh.shape["fsdp"], config, args.model,
                      "--batch " if args.batch else "data.batch_size=")
    return batch


def _with_device0(row: dict, config) -> dict:
    """``row`` with what DiTTask puts on each process's first device alone, outside the mesh: the frozen text
    encoder's weights (float32) and, with ``dit_train.latents='cached'``, the latent cache's copy of the VAE."""
    text = text_encoder_shape(config.text.encoder, int(config.text.max_length))[2]
    cache_vae = row["frozen"] if config.dit_train.get("latents", "on_the_fly") == "cached" else 0
    return dict(row, text_encoder=text, cache_vae=cache_vae, device0_peak=row["peak"] + text + cache_vae)


def _token_counts(text):
    """``--tokens`` as positive ints; a one-line error naming the flag otherwise."""
    try:
        values = [int(v) for v in text.split(",")] if text else []
    except ValueError:
        values = [0]
    if any(v < 1 for v in values):
        raise ValueError(f"--tokens={text!r} must be comma-separated positive ints, e.g. 4096,16384")
    return values


def _stands_in() -> bool:
    """Whether the plan compiles on virtual CPU devices it brought up for devices this machine lacks: they stand
    in for others (a GPU's). The machine's own devices, CPUs too, are those its training would run on."""
    import jax

    return jax.default_backend() == "cpu" and bool(os.environ.get(_CHILD))


def _configured_scan(config, args) -> bool:
    """Whether the config's DiT (``--preset``'s, with that flag) scans its blocks."""
    from vidiff.models.dit import dit_preset

    return dit_preset(args.preset or config.dit.preset, **({} if args.preset else dict(config.dit.overrides))
                      ).scan_blocks


def _layout(scan: bool, configured: bool) -> str:
    """The ``blocks`` cell: the layout compiled, and the config's when the plan compiled the other."""
    names = {True: "scanned", False: "unrolled"}
    return names[scan] if scan == configured else f"{names[scan]} (config: {names[configured]})"


def _dit_config(config, args, tokens, remat, on_cpu, stand_in):
    """The DiT config a row compiles (the config's or ``--preset``'s, with the flags' fields and what stands in
    for a GPU's attention and layout on CPUs), and its latent's (frames, height, width) for ``tokens``."""
    from vidiff.models.dit import dit_preset
    from vidiff.models.patches import latent_shape_for_tokens
    from vidiff.train.tasks import vae_from_config, video_shape

    vae = vae_from_config(config).config
    # --preset means that architecture as published: the config's overrides belong to its own preset.
    overrides = {} if args.preset else dict(config.dit.overrides)
    # As DiTTask builds it: the encoder's widths, which the config's overrides may replace.
    dim, pooled, _ = text_encoder_shape(config.text.encoder, int(config.text.max_length))
    fields = {"text_dim": dim, "pooled_dim": pooled, **overrides, "latent_channels": vae.latent_channels}
    if args.text_dim:  # asked for: both widths, whatever the encoder and the overrides say
        fields.update(text_dim=args.text_dim, pooled_dim=args.text_dim)
    for key, value in (("remat_policy", remat), ("dtype", args.dtype), ("attention_impl", args.attention)):
        if value is not None:
            fields[key] = None if value == "auto" else value
    # XLA:CPU keeps far more of an unscanned step's activations than a GPU does (XL, 16,384 tokens, block remat,
    # 8 devices: 102 GiB against 8.3 scanned); the layout changes no parameter, so scanned stands in for a GPU's.
    # On the CPUs that will train, the config's layout is what they will run.
    scan = args.scan if args.scan is not None else (True if stand_in else None)
    if scan is not None:
        fields["scan_blocks"] = scan
    attention = fields.get("attention_impl")
    if on_cpu and (attention == "cudnn" or (stand_in and attention is None)):
        # cuDNN flash attention (what None picks on a GPU) cannot compile here: chunked has its linear memory. Head
        # padding only picks a cuDNN kernel's size, and chunked takes none. None on the CPUs that train is XLA's.
        fields.update(attention_impl="chunked", attention_head_pad=0)
    cfg = dit_preset(args.preset or config.dit.preset, **fields)
    latent = latent_shape_for_tokens(tokens, cfg.patch) if tokens else vae.latent_shape(video_shape(config, 1))[1:4]
    return cfg, tuple(latent)


@functools.lru_cache(maxsize=8)
def text_encoder_shape(name: str, max_length: int) -> tuple[int, int, int]:
    """Token width, pooled width and parameter bytes of the text encoder ``name`` as ``text_encoder`` loads it
    (``vidiff.models.text.registry.encoder_shape``: no weight is converted), once per name and length."""
    from vidiff.models.text import registry

    return registry.encoder_shape(name, max_length)


def _abstract_batch(shapes: dict, mesh):
    """``{name: (shape, dtype)}`` as ShapeDtypeStructs sharded over the data axes, and those shardings."""
    import jax

    from vidiff import parallel

    shardings = {k: parallel.batch_sharding(mesh, len(s)) for k, (s, _) in shapes.items()}
    return {k: jax.ShapeDtypeStruct(s, d, sharding=shardings[k]) for k, (s, d) in shapes.items()}, shardings


def _dit_step(config, cfg, mesh, batch, latent):
    """The DiT step on ready latents, or, with ``dit_train.latents='on_the_fly'`` (the default), on uint8 clips
    that the frozen VAE encodes inside the step; the loss is ``DiTTask``'s own. The VAE's weights count either way."""
    import jax
    import numpy as np
    from flax import linen as nn

    from vidiff import parallel
    from vidiff.models.dit import VideoDiT, init_params
    from vidiff.models.vae import pixel_count
    from vidiff.train.dit_loss import dit_loss_fn
    from vidiff.train.tasks import vae_from_config

    dit = VideoDiT(cfg)
    text_len = int(config.text.max_length)
    shapes = {"text_tokens": ((batch, text_len, cfg.text_dim), np.float32),
              "text_lengths": ((batch,), np.int32), "pooled": ((batch, cfg.pooled_dim), np.float32)}
    # DiTTask holds the VAE on every device whatever the latents' source (it decodes the samples too).
    vae = vae_from_config(config)
    tf, sf = vae.config.time_factor, vae.config.spatial_factor
    variables = nn.unbox(jax.eval_shape(vae.init, jax.random.key(0), np.zeros((1, 1, 8 * sf, 8 * sf, 3))))
    replicated = parallel.replicated(mesh)
    frozen = ({"vae": jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated),
                                   variables)}, {"vae": jax.tree.map(lambda _: replicated, variables)})
    if config.dit_train.get("latents", "on_the_fly") == "on_the_fly":
        shapes["video"] = ((batch, pixel_count(latent[0], tf), latent[1] * sf, latent[2] * sf, 3), np.uint8)
    else:
        shapes["latents"] = ((batch, *latent, cfg.latent_channels), np.float32)
    return functools.partial(init_params, cfg), dit_loss_fn(dit, vae, config), _abstract_batch(shapes, mesh), frozen


def _vae_step(config, mesh, batch):
    """The VAE's step, and its networks: with the discriminator on, each gets its own AdamW, as in training."""
    import numpy as np

    from vidiff.train.tasks import VAETask, video_shape

    task = VAETask(config, mesh)
    return (task.init_params, task.loss_fn, _abstract_batch({"video": (video_shape(config, batch), np.uint8)}, mesh),
            ({}, {}), task.networks)


def _compile_row(config, model: str, mesh, init_params, loss_fn, batch_and_shardings, frozen_and_shardings,
                 label: dict, networks=None) -> dict:
    """``label`` with the bytes per device of one compiled train step, and its compile time."""
    import jax

    from vidiff import parallel
    from vidiff.train.optimizer import make_optimizer
    from vidiff.train.state import abstract_state, jit_train_step, make_train_step

    stage = config[f"{model}_train"]
    tx, _ = make_optimizer(stage.optim, stage.steps, networks=networks)
    batch, batch_shardings = batch_and_shardings
    frozen, frozen_shardings = frozen_and_shardings
    with jax.set_mesh(mesh), parallel.axis_rules():
        state, shardings = abstract_state(init_params, tx, mesh)
        step = jit_train_step(make_train_step(loss_fn, tx, ema_decay=stage.ema_decay,
                                              accumulate=stage.optim.accumulate), shardings, batch_shardings,
                              frozen_shardings, mesh, keep_unused=True)
        start = time.perf_counter()
        # Buffer assignment (what is measured) precedes code generation, whose LLVM -O0 halves CPU compiles.
        options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
        compiled = step.lower(state, batch, frozen).compile(options)
        seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    if os.environ.get("VIDIFF_PLAN_DEBUG"):
        print(m, file=sys.stderr)
    # Live at once: inputs (state donated into the outputs, so counted once), outputs, temporaries.
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return dict(label, mesh=",".join(f"{a}={n}" for a, n in mesh.shape.items() if n > 1) or "1 device",
                params=_per_device(state.params), optimizer=_per_device(state.opt_state),
                ema=_per_device(state.ema_params), batch=_per_device(batch), frozen=_per_device(frozen),
                activations=m.temp_size_in_bytes, peak=peak, text_encoder=0, cache_vae=0, device0_peak=peak,
                compile_s=seconds)


def _per_device(tree) -> int:
    """Bytes one device holds of ``tree`` (ShapeDtypeStructs with shardings)."""
    import jax

    return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _gib(n: int) -> str:
    """``n`` bytes in GiB, small amounts to two significant digits."""
    x = n / GiB
    return f"{x:.2f}" if x >= 0.1 or x == 0 else f"{x:.2g}"


def format_table(rows: list[dict], device_memory: float | None) -> str:
    """A markdown table, GiB per device, under a line that says so (and what device 0 holds besides)."""
    device0 = any(r["device0_peak"] > r["peak"] for r in rows)
    heads = ["model", "mesh", "tokens", "latent", "remat", "attention", "blocks", "params", "optimizer", "EMA", "batch",
             "frozen", "activations", "peak"] + (["device 0 peak"] if device0 else []) + (
             ["fits"] if device_memory else []) + ["compile s"]
    lines = ["memory in GiB (2^30 bytes) per device" + (_device0_note(rows[0]) if device0 else ""), "",
             "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        cells = [r["model"], r["mesh"], r.get("tokens", ""), r.get("latent", ""), r.get("remat", ""),
                 r.get("attention") or "auto", r.get("blocks", "")]
        cells += [_gib(r[k]) for k in ("params", "optimizer", "ema", "batch", "frozen", "activations", "peak")
                  + (("device0_peak",) if device0 else ())]
        if device_memory:  # the fullest device decides
            cells.append("yes" if r["device0_peak"] <= device_memory * GiB else "no")
        cells.append(f"{r['compile_s']:.0f}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _device0_note(row: dict) -> str:
    """The table's heading words for what device 0 holds outside the mesh."""
    held = [f"the frozen text encoder ({_gib(row['text_encoder'])})"] + (
        [f"the latent cache's copy of the VAE ({_gib(row['cache_vae'])})"] if row["cache_vae"] else [])
    return f"; device 0 (each process's first) also holds {' and '.join(held)}, in its 'device 0 peak'"

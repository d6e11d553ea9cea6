"""What ``bench_dit.py`` runs on, built and checked before anything compiles.

The DiT config its flags make, the latent shape and token count (from ``--tokens`` or
``--latent-shape``), the mesh and the batch it splits, the parameters as ``vidiff train`` draws them
(and where they are built, ``--init-on``), and random batches of normalised latents and text
embeddings placed on the mesh. A flag the model, the shapes or the mesh cannot take is a ValueError
here, which ``bench_dit.py`` prints in one line.
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from vidiff import parallel
from vidiff.models.dit import DiTConfig, dit_preset, init_params
from vidiff.models.patches import latent_shape_for_tokens, token_count
from vidiff.train.state import host_init_pays


def shapes_and_mesh(args) -> tuple[DiTConfig, jax.sharding.Mesh, tuple[int, ...], int]:
    """``(config, mesh, latent_shape, tokens)`` from the flags; a ValueError names the flag that does not fit."""
    cfg = build_config(args)
    if args.latent_shape:
        latent_shape = parse_ints(args.latent_shape, 3, "--latent-shape")
        tokens = tokens_of(latent_shape, cfg.patch)
    else:
        tokens = args.tokens
        latent_shape = latent_shape_for_tokens(tokens, cfg.patch)
    mesh = parallel.make_mesh(**dict(zip(parallel.MESH_AXES, args.mesh_sizes)))
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if args.batch % dp:
        raise ValueError(f"--batch: {args.batch} is not divisible by the data-parallel size data*fsdp={dp}")
    return cfg, mesh, latent_shape, tokens


def tokens_of(latent_shape, patch) -> int:
    for axis, size, p in zip(("t", "h", "w"), latent_shape, patch):
        if size % p:
            raise ValueError(f"--latent-shape: {axis}={size} is not divisible by the patch {tuple(patch)}")
    return token_count(latent_shape, patch)


def parse_ints(text: str, count: int, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != count:
        raise ValueError(f"{flag}: need {count} comma-separated integers, got {text!r}")
    return values


def build_config(args) -> DiTConfig:
    overrides = dict(text_dim=args.text_dim, pooled_dim=args.text_dim, latent_channels=args.latent_channels,
                     dtype=args.dtype, remat_policy=args.remat, scan_blocks=args.scan or args.scan_unroll > 1,
                     scan_unroll=args.scan_unroll, attention_impl=None if args.attention == "auto" else args.attention,
                     attention_head_pad=args.pad_head_dim, param_dtype=args.param_dtype,
                     fused_qk_rope=args.fused_qk_rope)
    for flag, field in (("dim", "width"), ("heads", "heads"), ("layers", "depth")):
        if getattr(args, flag) is not None:
            overrides[field] = getattr(args, flag)
    return dit_preset(args.preset, **overrides)


def random_batch(cfg: DiTConfig, batch: int, latent_shape, text_len: int, seed: int = 0) -> dict:
    """Host arrays: normalised latents, text-encoder tokens (all valid, as lengths) and pooled text."""
    rng = np.random.default_rng(seed)
    return {
        "latents": rng.standard_normal((batch, *latent_shape, cfg.latent_channels), np.float32),
        "text_tokens": rng.standard_normal((batch, text_len, cfg.text_dim), np.float32),
        "text_lengths": np.full((batch,), text_len, np.int32),
        "pooled": rng.standard_normal((batch, cfg.pooled_dim), np.float32),
    }


def put_batch(host: dict, mesh) -> tuple[dict, dict]:
    shardings = {k: parallel.batch_sharding(mesh, v.ndim) for k, v in host.items()}
    return {k: jax.device_put(v, shardings[k]) for k, v in host.items()}, shardings



def where_built(args, cfg: DiTConfig) -> str:
    """``--init-on``, with ``auto`` decided as ``vidiff train``'s ``init_on="auto"`` does (``host_init_pays``)."""
    if args.init_on != "auto":
        return args.init_on
    return "host" if host_init_pays(param_init(cfg)) else "device"


def param_init(cfg: DiTConfig):
    """``init(key)`` -> the DiT's parameters (boxed with logical names), as ``vidiff train`` builds them."""
    return functools.partial(init_params, cfg)


def param_shapes(cfg: DiTConfig):
    """The DiT's parameters as ``jax.ShapeDtypeStruct`` (nothing allocated)."""
    return jax.eval_shape(param_init(cfg), jax.random.key(0))


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))

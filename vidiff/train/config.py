"""Experiment configs: shape their training stages, validate.

A config is a ``get_config()`` file returning an ``ml_collections.ConfigDict``
(loaded by ``load_config``, which lives in ``vidiff.train.config_file`` and is
importable from here too). ``set_mesh`` applies ``--mesh``; ``train_stage``
builds a ``<model>_train`` section with every field the loop reads, and
``for_stage`` merges that stage's own ``data`` into ``data``.

``validate`` checks everything that can be checked without compiling (every section's fields by name through
``check_fields``, the seeds, shapes, mesh, the ``<model>_train`` numbers and optimizer through ``check_stage``,
``flow``, the clip sizes through ``clip_sizes.check_clip_sizes``, a DiT's ``text.encoder`` name and
``text.max_length`` through ``check_text_encoder``, which ``vidiff plan`` runs too, and the batch's split over the
devices through ``check_batch_split``, as ``vidiff plan`` refuses its ``--batch``) and fails with one line that
names the field and the fix;
``name_stage_fields`` rewrites such a line to name the stage's field in force.
``warnings_for`` lists settings that work but are likely not meant.
"""
from __future__ import annotations

import errno
import re
import stat
from pathlib import Path

import ml_collections

from vidiff.checks import MAX_TEXT_TOKENS, config_int, field_checker, finite_number, height_width
from vidiff.data.registry import FIELD_SOURCES
from vidiff.train.clip_sizes import check_clip_sizes, check_frame_count
from vidiff.train.config_file import check_fields, load_config  # noqa: F401  (load_config: the API's name for it)
from vidiff.train.overrides import keep_overridden, one_of, stage_override_warnings

MODELS = ("vae", "dit")
ON_NONFINITE = ("stop", "skip")
# <model>_train.init_on: the names of vidiff.train.state.INIT_ON (this module stays free of jax).
INIT_ON_NAMES = ("auto", "host", "device")
# The data fields that say where records are, and the data.source that reads each: the built-in sources' and
# those of sources registered by then (vidiff.data.register_source, e.g. from the config file), read when used.
SOURCE_FIELDS = FIELD_SOURCES


def train_stage(steps: int, lr: float, **fields) -> ml_collections.ConfigDict:
    """A ``<model>_train`` section with every field the loop reads, so any can be overridden on the command
    line: AdamW at peak ``lr`` with a cosine schedule over ``steps`` (warmup ``min(100, steps // 10)``, computed
    here: a later override of ``steps`` keeps it), EMA, logging, checkpoint and evaluation cadence; ``fields``
    add or replace entries (``eval_every=200``, a stage's ``data`` overrides, ``condition``, ...).
    docs/configs.md lists them all."""
    return ml_collections.ConfigDict(dict(
        steps=steps,  # optim is the stage's own: a field of that name is refused (a duplicate keyword), not merged
        optim=dict(lr=lr, schedule="cosine", warmup_steps=min(100, steps // 10), end_lr_fraction=0.1, b1=0.9,
                   b2=0.99, eps=1e-8, weight_decay=0.01, grad_clip=1.0, accumulate=1),
        **{"ema_decay": 0.999, "log_every": 10, "ckpt_every": 200, "keep": 2, "keep_best": 1, "eval_every": 500,
           "on_nonfinite": "stop", "profile": dict(start=10, steps=0), "init_on": "auto",  # profile.steps > 0: a trace
           "init_from": None, **fields}))


def set_mesh(config, spec: str) -> ml_collections.ConfigDict:
    """Replace ``config.mesh``'s sizes with ``spec`` (a preset such as ``fsdp_tensor``, ``"d,f,t,c"`` or
    ``"fsdp=4,context=2"``; ``vidiff train --mesh``), keeping its ``dcn``; returns ``config``."""
    from vidiff import parallel

    dcn = config.mesh.get("dcn")  # where processes go stays the config's (or the default)
    config.mesh = {**parallel.mesh_sizes(spec), **({"dcn": dcn} if dcn else {})}
    return config


def name_stage_fields(error: ValueError, config, model: str) -> ValueError:
    """``error`` with each ``data.<field>`` its message names that the stage sets (``<model>_train.data.<field>``)
    renamed to that: the stage's value is the one in force, so it is the one to change."""
    message = str(error)
    for field in config[f"{model}_train"].get("data") or {}:
        message = re.sub(rf"(?<![\w.])data\.{re.escape(field)}\b", f"{model}_train.data.{field}", message)
    error.args = (message,)
    return error


def for_stage(config, model: str) -> ml_collections.ConfigDict:
    """A copy of ``config`` whose ``data`` carries the stage's own overrides (``<model>_train.data``).

    The VAE, being convolutional and causal, can train on shorter clips than
    the DiT generates; each stage says so without a second config file.
    """
    config = keep_overridden(config, config.copy_and_resolve_references())
    overrides = config[f"{model}_train"].get("data")
    if overrides:
        unknown = sorted(set(overrides) - set(config.data))
        if unknown:
            raise ValueError(f"{model}_train.data has fields {unknown} that data does not; valid: {sorted(config.data)}")
        with config.data.ignore_type():
            config.data.update(dict(overrides))
    return config


def validate(config, model: str, device_count: int) -> None:
    """Fail early, one line per problem, for configs that cannot work (before anything compiles).

    The checks run in this order, which decides the error a config with two
    mistakes gets: the fields by name, the seeds, the stage's fields and workdir, the data source, the VAE and
    ``data.size``, (VAE) ``eval``, the DiT's text encoder, ``sample`` section and own settings, every trained
    clip size, and how the batch splits over the devices.
    """
    if model not in MODELS:
        raise ValueError(f"model={model!r} is unknown; train one of {MODELS}")
    from vidiff.train.profile import check_profile
    from vidiff.train.tasks import vae_from_config

    check_fields(config, model)
    _check_seeds(config)
    check_profile(config[f"{model}_train"], model)
    check_stage(config, model)
    _check_workdir(str(config.workdir), model)
    _check_world_source(config.data)
    vae_cfg = vae_from_config(config).config
    size = height_width(config.data.size)
    dit_cfg = None
    if model == "vae":
        _check_eval(config.get("eval"), vae_cfg.time_factor)
    if model == "dit":
        check_text_encoder(config)
        _check_sample(config.get("sample"))
        dit_cfg = _check_dit_settings(config)
    check_clip_sizes(config, model, size, vae_cfg, dit_cfg)
    _check_batch_split(config, model, device_count)


def check_stage(config, model: str) -> None:
    """The ``<model>_train`` numbers, its optimizer and (DiT) ``flow``: one line naming the field and the fix.

    Each of these would otherwise fail late (``log_every=0``: a division after
    compiling), or not at all (``steps=0`` exports an untrained model).
    """
    from vidiff.train.optimizer import check_optim

    stage, name = config[f"{model}_train"], f"{model}_train"
    need = field_checker(name, stage.get)

    def need_int(field: str, low: int, fix: str, default=None) -> None:
        # A field train_stage always writes is read as an attribute (check_fields named a missing one).
        value = getattr(stage, field) if default is None else stage.get(field, default)
        need(config_int(value) and value >= low, field, fix)

    need_int("steps", 1, "use an int >= 1 (optimizer steps in total)")
    need_int("log_every", 1, "use an int >= 1 (log every n steps)")
    need_int("ckpt_every", 1, "use an int >= 1 (the last step is always saved: a value >= steps saves only there)")
    need_int("eval_every", 0, "use an int >= 0 (0 = never)", default=0)
    need_int("keep", 1, "use an int >= 1", default=1)
    need_int("keep_best", 0, "use an int >= 0", default=0)
    # Anything but "stop" used to mean "skip": a typo must not switch the guard off.
    need(stage.get("on_nonfinite", "stop") in ON_NONFINITE, "on_nonfinite", "use 'stop' or 'skip'")
    need(stage.get("init_on", "auto") in INIT_ON_NAMES, "init_on",
         "use 'auto' (the host's CPU for many random draws on one process's accelerators), 'host' or 'device'")
    init_from = stage.get("init_from")
    need(init_from is None or (isinstance(init_from, str) and init_from.strip() != ""), "init_from",
         "use an export directory (one with vidiff.json, as <workdir>/export), 'bundled' or None")
    need(finite_number(stage.ema_decay) and 0 <= stage.ema_decay < 1, "ema_decay",
         "use a number in [0, 1), e.g. 0.999 (0 = no averaging)")
    if model == "vae":
        need_int("stats_batches", 1, "use an int >= 1", default=1)
    check_optim(stage.optim, f"{name}.optim")
    if model == "dit":
        # -1 cached nothing, silently; None failed as a TypeError once the models had loaded.
        need_int("cache_clips", 1, "use an int >= 1 (clips whose latents stay in host memory)", default=100_000)
        _check_flow(config.flow)


def _check_flow(flow) -> None:
    """``flow``'s names were read only while the first step compiled (after the models had loaded)."""
    from vidiff.diffusion.flow import LOSS_WEIGHTINGS, TIMESTEP_SAMPLERS

    need = field_checker("flow", flow.get)
    for field, names in (("timestep_sampler", TIMESTEP_SAMPLERS), ("weighting", LOSS_WEIGHTINGS)):
        need(flow[field] in names, field, one_of(flow[field], names))
    need(flow.shift == "auto" or (finite_number(flow.shift) and flow.shift > 0), "shift",
         "use a number > 0 (1 = no shift) or 'auto' (with shift <= 0 the shifted timesteps leave [0, 1])")


def _check_seeds(config) -> None:
    """``seed`` and ``data.seed``: a None or a string failed at the first random draw without naming the field,
    and a seed of 2**32 draws what 0 does (a key holds 32 bits of it)."""
    for field, value in (("seed", config.seed), ("data.seed", config.data.get("seed", 0))):
        if not (config_int(value) and 0 <= value < 2**32):
            raise ValueError(f"{field}={value!r} is invalid; use an int in [0, 2**32)")


def _check_eval(evaluation, time_factor: int) -> None:
    """The VAE's validation clips: no clip failed as numpy's "need at least one array to stack",
    ``num_frames=0`` evaluated the training length silently, and a length the VAE's time factor does not take
    failed at the first evaluation."""
    if evaluation is None:
        return
    need = field_checker("eval", evaluation.get)
    if "num_clips" in evaluation:
        need(config_int(evaluation.num_clips) and evaluation.num_clips >= 1, "num_clips",
             "use an int >= 1 (set vae_train.eval_every=0 to evaluate none)")
    frames = evaluation.get("num_frames")
    need(frames is None or (config_int(frames) and frames >= 1), "num_frames",
         "use an int >= 1, or None for the training clips' length")
    if frames is not None:
        check_frame_count("eval.num_frames", frames, time_factor)


def _check_workdir(workdir: str, model: str) -> None:
    """``workdir`` (and ``workdir/<model>``) must be folders or not exist yet: a file there fails late, deep inside
    the checkpointer, as ``[Errno 20] Not a directory``."""
    run_dir = Path(workdir) / model
    for path in (run_dir, *run_dir.parents):
        # One stat per path: another process of the run (process 0's orbax) may create the folder meanwhile,
        # and a look that found nothing followed by one that finds it must not read as a file.
        try:
            is_dir = stat.S_ISDIR(path.stat().st_mode)
        except OSError as error:
            if error.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):  # not there (yet): look further up
                continue
            raise
        if is_dir:
            return
        if path == Path(workdir):
            raise ValueError(f"workdir {workdir} is a file; give a folder")
        raise ValueError(f"workdir {workdir}: {path} is a file, not a folder; give another workdir")


def check_text_encoder(config) -> None:
    """``text.encoder`` is a name the text-encoder registry reads and ``text.max_length`` what an export may hold,
    checked before anything loads."""
    from vidiff.models.text.registry import VALID_NAMES, known_name

    if not known_name(config.text.encoder):
        raise ValueError(f"text.encoder={config.text.encoder!r} is not a text encoder; valid: {VALID_NAMES}")
    length = config.text.max_length
    field_checker("text", config.text.get)(config_int(length) and 1 <= length <= MAX_TEXT_TOKENS, "max_length",
                                           f"use an int from 1 to {MAX_TEXT_TOKENS} (tokens per caption)")


def _check_world_source(data) -> None:
    """The built-in world reads no files: a path set means another source was meant."""
    if data.source != "world":
        return
    if given := [f for f in SOURCE_FIELDS if data.get(f) not in (None, "")]:
        field = given[0]
        raise ValueError(f"data.{field}={data[field]!r} is set but data.source='world' reads no files; "
                         f"set data.source={SOURCE_FIELDS[field]!r} to train on it (or unset data.{field})")


def _check_sample(sample) -> None:
    """``sample``: the preview clips' settings, and the exported model's sampling defaults. A bad one failed at
    the first evaluation, after the training it cost, or (``eval_every=0``) in every ``vidiff generate`` of it."""
    from vidiff.diffusion.samplers import SAMPLE_DEFAULTS, SAMPLERS

    if sample is None:
        return
    need = field_checker("sample", sample.get)
    prompts = sample.get("prompts")
    need(isinstance(prompts, (list, tuple)) and len(prompts) > 0 and all(isinstance(p, str) for p in prompts),
         "prompts", "use a list of caption strings, one preview clip each")
    steps, sampler, guidance = ({**SAMPLE_DEFAULTS, **sample}[name] for name in ("steps", "sampler", "guidance"))
    need(config_int(steps) and steps >= 1, "steps", "use an int >= 1")
    need(sampler in SAMPLERS, "sampler", one_of(sampler, SAMPLERS))
    need(finite_number(guidance), "guidance", "use a finite number (1.0 = no guidance)")


def _check_dit_settings(config):
    """The DiT stage's settings that no clip size depends on; returns the DiT's config (its patch sizes the clips)."""
    from vidiff.models.dit import dit_preset

    if config.dit_train.get("latents") == "prepared":
        _check_prepared_data(config.data)
    dit_cfg = dit_preset(config.dit.preset, **config.dit.overrides)
    if dit_cfg.param_dtype != "float32":
        # The trained parameters are the master weights and set AdamW's moments' dtype: in bfloat16 most
        # small updates round away (20 steps at lr 1e-4 left 90% of a kernel's entries unchanged).
        raise ValueError(f"dit.overrides.param_dtype={dit_cfg.param_dtype!r}: training keeps float32 weights "
                         f"and AdamW state (bfloat16 ones lose small updates); keep param_dtype='float32' and "
                         f"set dit.overrides.dtype='bfloat16' for bfloat16 compute")
    condition = dict(config.dit_train.get("condition") or {})
    if not dit_cfg.conditioning_frames and any(float(p) > 0 for m, p in condition.items() if m != "none"):
        # dit_flow_loss can only give known frames to a DiT that takes them as input: it would train
        # text-to-video alone, silently.
        raise ValueError(
            f"dit_train.condition={condition} needs a DiT that takes the known frames, but "
            f"dit.overrides.conditioning_frames=False; set it True or drop dit_train.condition"
        )
    return dit_cfg


def _check_prepared_data(data) -> None:
    """``dit_train.latents='prepared'`` reads ``vidiff prepare --latents`` shards as they were stored."""
    if data.source != "array_record":
        raise ValueError(
            f"dit_train.latents='prepared' needs data.source='array_record' (shards from `vidiff prepare "
            f"--latents`), got data.source={data.source!r}"
        )
    if data.get("image_fraction"):
        # Prepared latents belong to the stored clip, so the data must ask for it as is: one bucket, no images.
        buckets = " and data.buckets=None" if data.get("buckets") else ""
        raise ValueError(f"data.image_fraction={data.image_fraction!r} cannot cut images from "
                         f"dit_train.latents='prepared' shards (their latents fit the stored clip: one bucket); "
                         f"set data.image_fraction=0.0{buckets}")


def _check_batch_split(config, model: str, device_count: int) -> None:
    """``data.batch_size`` over the data-parallel devices of the configured mesh."""
    from vidiff import parallel

    sizes = parallel.resolve_sizes(parallel.mesh_sizes(config.mesh.to_dict()), device_count)  # presets, dcn, -1
    check_batch_split(int(config.data.batch_size), sizes["data"] * sizes["fsdp"], config, model)


def check_batch_split(batch: int, data_parallel: int, config, model: str, named: str = "data.batch_size=") -> None:
    """``batch`` (``named``: how the user gave it) over ``data_parallel`` devices, and into ``optim.accumulate``
    micro-batches that each spread over them all; ``vidiff plan`` refuses its ``--batch`` in the same words."""
    if batch % data_parallel:
        raise ValueError(f"{named}{batch} is not divisible by the data-parallel devices mesh.data x mesh.fsdp = "
                         f"{data_parallel}; use a multiple of {data_parallel}")
    accumulate = config[f"{model}_train"].optim.accumulate
    if batch % (accumulate * data_parallel):
        raise ValueError(f"{named}{batch} does not split into {model}_train.optim.accumulate={accumulate} "
                         f"micro-batches over mesh.data x mesh.fsdp = {data_parallel} devices; use a multiple of "
                         f"{accumulate * data_parallel} or a smaller accumulate")


def warnings_for(config, model: str) -> list[str]:
    """Settings that work but are likely not meant; the loop logs them (one line each)."""
    stage, out = config[f"{model}_train"], []
    if int(stage.optim.warmup_steps) >= int(stage.steps):
        out.append(f"warning: {model}_train.optim.warmup_steps={stage.optim.warmup_steps} >= {model}_train.steps="
                   f"{stage.steps}: the learning rate never reaches optim.lr={stage.optim.lr:g}")
    out += stage_override_warnings(config, model)
    out += _partial_batch_warnings(config.data)
    out += _unread_field_warnings(config.data)
    return out


def _unread_field_warnings(data) -> list[str]:
    """A field naming records set beside a source that reads another field (for the world, which reads none,
    ``_check_world_source`` refuses it instead)."""
    source = data.get("source")
    if source not in SOURCE_FIELDS.values():
        return []
    return [f"warning: data.{field} is set but data.source={source!r} does not read it (data.source={reader!r} does)"
            for field, reader in SOURCE_FIELDS.items() if data.get(field) not in (None, "") and source != reader]


def _partial_batch_warnings(data) -> list[str]:
    """The data's epochs are repeated before batching, so only the end of the whole stream can leave a
    partial batch; its new shape costs a second compile of the step (minutes for a large DiT)."""
    if data.get("num_epochs") is None or data.get("drop_remainder", True):
        return []
    batch = int(data.batch_size)
    return [f"warning: data.drop_remainder=False with data.num_epochs={data.num_epochs}: a run that reads to the end "
            f"of the data ends on a partial batch (one per bucket) whose new shape compiles the train step again "
            f"for that one step; set data.drop_remainder=True to skip it, which leaves out the last "
            f"{batch - 1} clips or fewer (per bucket, not counted anywhere)"]

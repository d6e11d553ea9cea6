"""Rectified flow (``flow``), its samplers with classifier-free guidance (``samplers``), the known-frame masks
training draws for each prompting mode (``conditioning``), and sampling latents from a VideoDiT (``sampling``).

The package exports ``flow`` and ``samplers``; ``conditioning`` and ``sampling`` are imported by module.
"""
from vidiff.diffusion.flow import (
    flow_loss,
    noise_latents,
    predict_x0,
    resolve_shift,
    sample_timesteps,
    shift_for_tokens,
    shift_timesteps,
    velocity_target,
)
from vidiff.diffusion.samplers import SAMPLERS, classifier_free_guidance, sample, timestep_schedule

__all__ = [
    "SAMPLERS",
    "classifier_free_guidance",
    "flow_loss",
    "noise_latents",
    "predict_x0",
    "resolve_shift",
    "sample",
    "sample_timesteps",
    "shift_for_tokens",
    "shift_timesteps",
    "timestep_schedule",
    "velocity_target",
]

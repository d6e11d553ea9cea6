"""vidiff: Sora-style text-to-video diffusion in JAX/Flax.

Import what you need from the submodules (``vidiff.models.vae``,
``vidiff.models.dit``, ``vidiff.models.text``, ``vidiff.diffusion``,
``vidiff.parallel``, ``vidiff.data``, ``vidiff.io``); importing ``vidiff``
itself loads nothing heavy.
"""

__version__ = "0.1.0"

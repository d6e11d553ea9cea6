"""Any TFDS dataset through `tfds.data_source` (no TensorFlow), mapped to the schema by configurable keys."""
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from etils import epath  # noqa: E402

from vidiff.data import SkipLedger, make_pipeline, record_stream  # noqa: E402


class TinyTfdsClips(tfds.core.GeneratorBasedBuilder):
    """A video dataset with its own feature names (tfds.features.Video needs TensorFlow; Tensor does not)."""

    VERSION = tfds.core.Version("1.0.0")
    pkg_dir_path = epath.Path(__file__).parent  # no metadata folder: tfds only needs a directory

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "clip": tfds.features.Tensor(shape=(6, 12, 16, 1), dtype=np.uint8),
            "description": tfds.features.Text(),
            "action": tfds.features.ClassLabel(num_classes=3),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        yield 0, {"clip": np.zeros((6, 12, 16, 1), np.uint8), "description": "x", "action": 0}


def tfds_config(**overrides):
    return {"source": "tfds", "tfds_name": "tiny_tfds_clips", "tfds_video_key": "clip",
            "tfds_caption_key": "description", "tfds_label_keys": ["action"], "tfds_fps": 6.0,
            "num_frames": 4, "size": 8, "batch_size": 3, "num_epochs": 1, "shuffle": False,
            "read_threads": 1, "read_buffer_size": 2, **overrides}


def test_tfds_mock_data_maps_features_to_the_schema():
    with tfds.testing.mock_data(num_examples=7, policy=tfds.testing.MockPolicy.USE_CODE):
        ledger = SkipLedger()
        records = list(record_stream(tfds_config(), skips=ledger))
        batches = list(make_pipeline(tfds_config(drop_remainder=False)))
    assert ledger.seen == 7 and ledger.skipped == {}
    assert [r["id"] for r in records] == [f"tiny_tfds_clips/train/{i}" for i in range(7)]
    for record in records:
        assert record["video"].shape == (4, 8, 8, 3) and record["video"].dtype == np.uint8
        assert np.array_equal(record["video"][..., 0], record["video"][..., 2])  # grey repeated to RGB
        assert isinstance(record["caption"], str) and record["caption"]
        assert record["fps"] == np.float32(6) and 0 <= record["labels"]["action"] < 3
    assert [len(b["caption"]) for b in batches] == [3, 3, 1] and batches[0]["labels"]["action"].shape == (3,)


def test_tfds_unknown_feature_key_fails_early_with_the_feature_list():
    with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
        with pytest.raises(ValueError, match=r"data.tfds_video_key='video' is not a feature of tiny_tfds_clips; its features are \['action', 'clip', 'description'\]"):
            make_pipeline(tfds_config(tfds_video_key="video"))
        unconditional = list(record_stream(tfds_config(tfds_caption_key=None, tfds_label_keys=())))
    assert [r["caption"] for r in unconditional] == ["", ""] and "labels" not in unconditional[0]

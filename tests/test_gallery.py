"""experiments/make_gallery.py on the tiny random model: one gif and one png strip per prompt, and the markdown."""
import sys
from pathlib import Path

import pytest

from tiny_model import tiny_model_dir
from vidiff import io
from vidiff.data import world

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import make_gallery  # noqa: E402


def test_prompts_cover_held_out_combinations_and_paraphrases():
    prompts = [p for p, _, _ in make_gallery.PROMPTS]
    assert set(world.prompts_for(world.HELD_OUT)) <= set(prompts)
    kinds = [k for _, k, _ in make_gallery.PROMPTS]
    assert kinds.count("held out, paraphrased") == 2 and kinds.count("seen in training") == 2
    assert not set(make_gallery.SEEN) & set(world.HELD_OUT)
    assert len(set(map(make_gallery.slug, prompts))) == len(prompts)  # no two prompts share a file


@pytest.mark.filterwarnings("ignore:prompt .* is longer")  # the tiny model reads 8 tokens; the paraphrases are longer
def test_gallery_files_and_markdown(tmp_path, capsys):
    out = tmp_path / "gallery"
    assert make_gallery.main(["--checkpoint", str(tiny_model_dir()), "--out", str(out), "--steps", "2",
                              "--scale", "2", "--link-prefix", "docs/gallery"]) == 0
    n = len(make_gallery.PROMPTS)
    gifs, pngs = sorted(out.glob("*.gif")), sorted(out.glob("*.png"))
    assert len(gifs) == len(pngs) == n and len(list(out.iterdir())) == 2 * n
    # The tiny model makes 9-frame 16x16 clips; scale 2 -> 32x32 frames, the strip is one row of 9 (2-pixel padding).
    frames, fps = io.read_video(gifs[0])
    assert frames.shape == (9, 32, 32, 3) and fps == pytest.approx(8.0, abs=0.5)  # gif delays are whole 10 ms
    strip = io.read_image(pngs[0])
    assert strip.shape == (2 + 32 + 2, 9 * (32 + 2) + 2, 3)
    markdown = capsys.readouterr().out
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table) == 2 + n  # header, separator, one row per prompt
    for gif, png in zip(gifs, pngs):
        assert f"(docs/gallery/{gif.name})" in markdown and f"(docs/gallery/{png.name})" in markdown
    assert "a red triangle moving left" in markdown and "held out, paraphrased" in markdown


def test_gallery_refuses_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    """As `vidiff generate --checkpoint` says it: one line and status 2, before anything is written."""
    with pytest.raises(SystemExit) as exit:
        make_gallery.main(["--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "gallery")])
    assert (exit.value.code, capsys.readouterr().err.splitlines()) == (
        2, [f"make_gallery.py: error: model directory {tmp_path / 'none'} does not exist"])
    assert not (tmp_path / "gallery").exists()

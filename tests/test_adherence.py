"""Prompt-adherence and mode evaluation: prompt sets, the scoring path on real world clips, the CLI's JSON."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from tiny_model import REPO, tiny_model_dir
from vidiff.cli import main
from vidiff.data import world
from vidiff.eval import adherence


def world_clip_of(combo, size=32, frames=17):
    """A rendered world clip showing ``combo`` (the first record of the held-out world that does)."""
    source = world.CaptionedWorld(world.WorldConfig(num_frames=frames, size=size, held_out="only", seed=3))
    for i in range(500):
        labels = source[i]["labels"]
        if (labels["color"], labels["shape"], labels["direction"]) == tuple(combo):
            return source[i]["video"]
    raise AssertionError(f"no clip of {combo}")


def test_paraphrases_are_wordings_no_template_produces():
    every = world.allowed_combos(world.WorldConfig(held_out="include"))
    seen = {world.phrase(t, {"color": c, "shape": s, "direction": d, "size": size})
            for c, s, d in every for size in world.SIZES
            for t in world.DIVERSE_TEMPLATES + world.PARAPHRASE_TEMPLATES}
    mine = {adherence.paraphrase(combo, k) for combo in every for k in range(len(adherence.PARAPHRASES))}
    assert len(mine) == len(every) * len(adherence.PARAPHRASES) and not mine & seen
    assert adherence.paraphrase(("red", "triangle", "left"), 1) == "an animation of a red triangle heading in the left direction"


def test_varied_and_diverse_training_captions_use_none_of_the_paraphrases_own_words():
    every = world.allowed_combos(world.WorldConfig(held_out="include"))

    def words(templates):
        return {w for c, s, d in every for size in world.SIZES for t in templates
                for w in re.findall(r"[a-z]+", world.phrase(t, {"color": c, "shape": s, "direction": d, "size": size}))}

    evaluation = {w for combo in every for k in range(len(adherence.PARAPHRASES))
                  for w in re.findall(r"[a-z]+", adherence.paraphrase(combo, k))}
    own = evaluation - words(world.TRAIN_TEMPLATES)
    assert {"top", "bottom", "edge", "direction", "towards", "heading"} <= own
    assert not own & words(world.VARIED_TEMPLATES) and not own & words(world.DIVERSE_TEMPLATES)
    assert len(world.VARIED_TEMPLATES) == 58 and set(world.TRAIN_TEMPLATES) < set(world.VARIED_TEMPLATES)
    assert len(set(world.DIVERSE_TEMPLATES)) == 234 and world.DIVERSE_TEMPLATES[:58] == world.VARIED_TEMPLATES
    assert world.caption({"color": "red", "shape": "circle", "size": "small", "direction": "up"}, 10, "varied") \
        == "a red circle rising"
    # Shape before colour and motion first, both absent from "varied".
    diverse = {world.caption({"color": "red", "shape": "circle", "size": "small", "direction": "up"}, k, "diverse")
               for k in range(234)}
    assert {"a circle that is red, soaring", "floating up: a red circle"} <= diverse


def test_cases_cover_every_held_out_combination_and_seed():
    cases = adherence.cases("heldout", seeds=3)
    assert len(cases) == 3 * len(world.HELD_OUT)
    assert {(c.color, c.shape, c.direction) for c in cases} == set(world.HELD_OUT)
    assert cases[0].prompt == "a red triangle moving left" and [c.seed for c in cases[:3]] == [0, 1, 2]
    paraphrased = adherence.cases("paraphrase", seeds=[7])
    assert {c.prompt for c in paraphrased} == {adherence.paraphrase(combo, i) for i, combo in enumerate(world.HELD_OUT)}
    with pytest.raises(ValueError, match="prompt set 'typos' is unknown"):
        adherence.cases("typos")


def test_ground_truth_clips_score_perfectly_and_wrong_ones_do_not(tmp_path):
    cases = adherence.cases("heldout", seeds=[0, 1])
    truth = {c.prompt: world_clip_of((c.color, c.shape, c.direction)) for c in cases}
    calls = []

    def render(prompts, seed):
        calls.append((len(prompts), seed))
        return np.stack([truth[p] for p in prompts])

    summary = adherence.evaluate(render, cases)
    assert calls == [(6, 0), (6, 1)]  # one batched call per seed
    assert summary["num_clips"] == 12
    assert summary["accuracy"] == {"color": 1.0, "shape": 1.0, "direction": 1.0, "all": 1.0}
    assert set(summary["per_combination"]) == {" ".join(c) for c in world.HELD_OUT}
    first = summary["clips"][0]
    assert first["prompt"] == "a red triangle moving left" and first["seed"] == 0
    assert first["predicted"] == first["labels"] == {"color": "red", "shape": "triangle", "direction": "left"}
    assert first["correct"] == {"color": True, "shape": True, "direction": True, "all": True}
    table = adherence.format_table(summary).splitlines()
    assert len(table) == 2 + 6 + 2 and table[-1].split() == ["all", "12", "100.0%", "100.0%", "100.0%", "100.0%"]
    # Mirrored clips keep colour and shape but reverse the motion: the scorer notices.
    flipped = adherence.evaluate(lambda prompts, seed: render(prompts, seed)[:, ::-1], cases)
    assert flipped["accuracy"] == {"color": 1.0, "shape": 1.0, "direction": 0.0, "all": 0.0}
    # A direction the scorer cannot check (None) is left out of the rate, not counted wrong.
    row = lambda direction: {"labels": {"color": "red"}, "correct": {"color": True, "shape": True,
                                                                      "direction": direction, "all": direction}}
    assert adherence.summarize([row(True), row(None)])["accuracy"] == {"color": 1.0, "shape": 1.0,
                                                                        "direction": 1.0, "all": 1.0}
    path = adherence.write_json(summary, tmp_path / "out" / "adherence.json")
    assert json.loads(path.read_text())["accuracy"]["all"] == 1.0


def test_write_json_writes_whole_or_leaves_the_old_file(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    path = tmp_path / "adherence.json"
    path.write_text('{"previous": "result"}')
    real_write_text = Path.write_text

    def disk_fills(self, text, *args, **kwargs):  # half the text reaches the disk, then it is full
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_fills)
    with pytest.raises(OSError, match=rf"^{re.escape(str(path))} could not be written \(No space left on device\); "
                                      r"free disk space and run again, or choose a writable --out$"):
        adherence.write_json({"accuracy": {"all": 1.0}, "clips": ["verdict"] * 100}, path)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"previous": "result"} and [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.slow
def test_eval_commands_print_and_write_json(tmp_path, capsys):
    model = str(tiny_model_dir())
    code = main(["eval", "adherence", "--checkpoint", model, "--seeds", "1", "--steps", "2", "--batch-size", "1",
                 "--devices", "2", "--prompts", "paraphrase", "--out", str(tmp_path / "adherence.json"),
                 "--dtype", "bfloat16"])
    out, err = capsys.readouterr()
    assert code == 0, err
    written = json.loads((tmp_path / "adherence.json").read_text())
    assert written["num_clips"] == 6 and written["prompts"] == "paraphrase" and len(written["clips"]) == 6
    assert set(written["accuracy"]) == {"color", "shape", "direction", "all"}
    for key in ("color", "shape", "direction", "all"):  # the summary is the clips' own verdicts, averaged
        judged = [c["correct"][key] for c in written["clips"] if c["correct"][key] is not None]
        assert written["accuracy"][key] == (pytest.approx(np.mean(judged)) if judged else None)
    assert written["sampling"] == {"steps": 2, "guidance": 4.0, "sampler": "euler"}
    assert written["dtype"] == {"dit": "bfloat16", "vae": "bfloat16"}
    assert any(line.startswith("combination") for line in err.splitlines())  # the table, after any warning
    assert json.loads(out)["accuracy"] == written["accuracy"]

    code = main(["eval", "modes", "--checkpoint", model, "--clips", "1", "--steps", "2", "--strength", "0.3",
                 "--out", str(tmp_path / "modes.json"), "--scan-blocks"])  # every mode with the blocks scanned
    out, err = capsys.readouterr()
    assert code == 0, err
    written = json.loads((tmp_path / "modes.json").read_text())
    means = written["means"]
    assert written["dtype"] == {"dit": "float32", "vae": "float32"}  # as the model was trained
    # The modes summary recorded no sampling settings, so runs at --steps 4 and 2 read alike: now adherence's
    # block (the model's defaults filled in) and the seeds, in the file and in what is printed.
    assert written["sampling"] == {"steps": 2, "guidance": 4.0, "sampler": "euler"}
    assert (written["seed"], written["world_seed"], written["strength"]) == (0, 777, 0.3)
    assert {k: json.loads(out)[k] for k in ("sampling", "seed", "world_seed")} == {
        "sampling": written["sampling"], "seed": 0, "world_seed": 777}
    assert set(means) == {"image_to_video", "extend_forward", "extend_backward", "connect", "edit", "loop"}
    i2v = means["image_to_video"]
    # The first frame is the VAE's round trip of the input (decoder causal, latent 0 known).
    assert abs(i2v["first_frame_psnr"] - i2v["vae_ceiling_psnr"]) < 0.5
    assert abs(means["connect"]["first_frame_psnr"] - i2v["vae_ceiling_psnr"]) < 0.5
    assert set(means["edit"]) == {"colour_changed", "shape_kept", "direction_kept"} and means["loop"]["seam_ratio"] > 0

    assert main(["eval", "modes", "--checkpoint", model, "--strength", "1.5"]) == 2
    assert "--strength=1.5 must be in (0, 1]" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["eval", "adherence", "--checkpoint", model, "--out", str(tmp_path / "file" / "a.json")]) == 2
    assert capsys.readouterr().err.startswith(f"vidiff eval: error: cannot write {tmp_path / 'file' / 'a.json'}: ")


def test_unknown_template_sets_fail_in_one_line_naming_the_sets():
    labels = {"color": "red", "shape": "circle", "size": "small", "direction": "up"}
    for call in (lambda: world.caption(labels, 0, "fancy"), lambda: world.prompts_for([("red", "circle", "up")], "fancy")):
        with pytest.raises(ValueError, match=r"^template_set='fancy'; use one of train, paraphrase, varied, diverse$"):
            call()


@pytest.mark.parametrize("argv, message", [
    (["adherence", "--batch-size", "0"], "--batch-size=0 must be at least 1 (omit it for 8 at a time)"),
    (["adherence", "--guidance", "nan"], "--guidance=nan must be a finite number (1 = off)"),
    (["adherence", "--devices", "9"], "--devices=9 is more than the 8 cpu device(s) here; give at most 8, or all"),
    (["modes", "--steps", "-2"], "--steps=-2 must be at least 1"),
    # Each flag's own line: argparse's choices= printed its usage too, and one check named --clips and --strength.
    (["adherence", "--prompts", "bogus"], "--prompts=bogus is unknown; use heldout or paraphrase"),
    (["adherence", "--sampler", "bogus"], "--sampler=bogus is unknown; use euler, heun or dpmpp_2m"),
    (["modes", "--strength", "0"], "--strength=0.0 must be in (0, 1]"),
    (["modes", "--clips", "0"], "--clips=0 must be at least 1"),
    (["modes", "--dtype", "fp16"], "--dtype=fp16 is not a compute dtype; use float32, bfloat16, float16, or no "
     "--dtype to compute as the model was trained"),
])
def test_eval_flags_are_checked_before_the_model_loads(argv, message, capsys, monkeypatch):
    import vidiff.pipeline

    monkeypatch.setattr(vidiff.pipeline.TextToVideo, "from_checkpoint", lambda *a, **k: pytest.fail("the model loaded"))
    assert main(["eval", *argv]) == 2
    assert capsys.readouterr().err.strip() == f"vidiff eval: error: {message}"


def test_seam_ratio_and_psnr_on_clips_with_known_answers():
    from vidiff.eval.modes import psnr_uint8, seam_ratio

    frame = lambda value: np.full((4, 4, 3), value, np.uint8)  # noqa: E731
    assert seam_ratio(np.stack([frame(0), frame(10), frame(0)])) == 0.0  # wraps back exactly
    assert seam_ratio(np.stack([frame(0), frame(10), frame(20)])) == pytest.approx(2.0)  # the wrap is two steps
    assert seam_ratio(np.stack([frame(5)] * 3)) == 0.0  # a still clip: no division by zero
    assert psnr_uint8(frame(7), frame(7)) == 100.0
    assert psnr_uint8(frame(0), frame(1)) == pytest.approx(10 * np.log10(255.0**2))
    from vidiff.train.metrics import psnr  # training's: the same dB for differing frames, 106 for identical ones

    as_float = lambda value: frame(value)[None].astype(np.float32) / 127.5 - 1.0  # noqa: E731
    assert float(psnr(as_float(0), as_float(1))[0]) == pytest.approx(10 * np.log10(255.0**2), abs=1e-3)
    assert float(psnr(as_float(7), as_float(7))[0]) == pytest.approx(106.02, abs=0.01)


class _GroundTruthPipe:
    """A stand-in pipeline that answers every mode with the world clip it was asked about (the clip whose first
    frame, context or ends it was given), so the scoring, not a model, is what the evaluation measures."""

    train_frames, train_size, time_factor = 17, (32, 32), 4

    def __init__(self, clips):
        self.clips = clips

    def _clip_with(self, frames):
        return next(c for c in self.clips if any(np.array_equal(frames[0], f) for f in c))

    def image_to_video(self, prompts, image, **_):
        return self._clip_with(image[None])[None]

    def extend(self, prompts, context, **_):
        return self._clip_with(context)[None]

    def connect(self, prompts, first, last, **_):
        return self._clip_with(first)[None]

    def edit(self, prompts, video, **_):
        return video[None]

    def loop(self, prompts, **_):
        return self.clips[0][None]

    def encode(self, video):
        return video

    def decode(self, latents):
        return latents[None]


def test_evaluate_modes_scores_ground_truth_answers_as_perfect():
    from vidiff.eval import modes

    clips = [record["video"] for record in modes.world_clips(_GroundTruthPipe([]), 2)]
    result = modes.evaluate_modes(_GroundTruthPipe(clips), num_clips=2)
    means = result["means"]
    assert result["num_clips"] == 2 and result["strength"] == 0.7
    assert (result["seed"], result["world_seed"]) == (0, 777)  # the seeds its clips and noise came from
    for mode in ("image_to_video", "extend_forward", "extend_backward", "connect"):
        assert {means[mode][key] for key in ("color", "shape", "direction", "all")} == {1.0}, mode
    assert means["image_to_video"]["first_frame_psnr"] == means["image_to_video"]["vae_ceiling_psnr"] == 100.0
    assert means["extend_forward"]["context_psnr"] == means["extend_backward"]["context_psnr"] == 100.0
    assert means["connect"]["first_frame_psnr"] == means["connect"]["last_frame_psnr"] == 100.0
    # The edit is scored against the prompt's new colour: the unchanged clip keeps shape and motion, not colour.
    assert means["edit"] == {"colour_changed": 0.0, "shape_kept": 1.0, "direction_kept": 1.0}
    assert result["clips"][0]["edit"]["prompt"] != result["clips"][0]["prompt"]
    assert means["loop"]["seam_ratio"] == pytest.approx(np.mean([modes.seam_ratio(clips[0])] * 2))


def test_eval_does_not_import_its_sibling_command():
    """``vidiff eval`` takes the flags and checks it shares with ``vidiff generate`` from ``vidiff.cli_flags``."""
    code = ("import sys, vidiff.eval.command; "
            "print(sorted(m for m in sys.modules if m in ('vidiff.generate', 'vidiff.cli_flags')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.stdout.strip() == "['vidiff.cli_flags']", result.stderr

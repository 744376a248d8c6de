"""scripts/evaluate.py on folders of real files: the image formats users save (16-bit, RGBA, EXIF-rotated JPEG),
broken cases reported by name while the others are still scored, exit codes, and numbers checked by hand."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blended.errors import BlendedInputError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def evaluate():
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GREY = 100  # the input: flat grey, so every number below can be worked out by hand
SIZE, BOX = 16, (4, 12, 4, 12)  # a 16x16 picture, an 8x8 edited square


def _make_case(folder: Path, results: dict, mask_mode="L") -> Path:
    """A case: a flat grey image.png, a white square on black mask.png, and ``results`` {name: uint8 HxWx3}."""
    (folder / "results").mkdir(parents=True)
    Image.fromarray(np.full((SIZE, SIZE, 3), GREY, np.uint8)).save(folder / "image.png")
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[BOX[0]:BOX[1], BOX[2]:BOX[3]] = 255
    if mask_mode == "RGBA":  # white on black with an opaque alpha, as many editors save a mask
        rgba = np.dstack([mask, mask, mask, np.full_like(mask, 255)])
        Image.fromarray(rgba, "RGBA").save(folder / "mask.png")
    else:
        Image.fromarray(mask).save(folder / "mask.png")
    for name, array in results.items():
        Image.fromarray(array).save(folder / "results" / name)
    return folder


def _untouched():
    return np.full((SIZE, SIZE, 3), GREY, np.uint8)


def _four_background_pixels_changed():
    array = _untouched()
    array[0, 0:4] = 200  # outside the mask
    array[6, 6] = 0      # inside it: no effect on the background scores
    return array


def _rows(out: str) -> dict:
    return {line.split()[0]: line.split() for line in out.splitlines() if line.strip() and "  " in line}


def test_background_scores_match_a_hand_calculation(evaluate, tmp_path, capsys):
    """MSE over the kept pixels and channels (BrushBench's protocol), PSNR from it, printed with the table."""
    _make_case(tmp_path / "case", {"a.png": _untouched(), "b.png": _four_background_pixels_changed()})
    assert evaluate.main([str(tmp_path / "case")]) == 0
    rows = _rows(capsys.readouterr().out)
    kept = SIZE * SIZE - 8 * 8                               # 192 pixels outside the mask, 3 channels each
    mse = 4 * 3 * ((200 - GREY) / 255) ** 2 / (kept * 3)     # 4 pixels off by 100 levels in every channel
    assert rows["a.png"][2] == "inf" and float(rows["a.png"][3]) == 0
    assert float(rows["b.png"][3]) == pytest.approx(mse, rel=1e-2)                    # printed as {:.3g}
    assert float(rows["b.png"][2]) == pytest.approx(10 * math.log10(1 / mse), abs=0.005)
    assert float(rows["mean"][3]) == pytest.approx(mse / 2, rel=1e-2) and rows["mean"][2] == "inf"
    assert float(rows["a.png"][5]) == 0 and float(rows["a.png"][6]) == 0           # untouched: no seam
    assert rows["a.png"][1] == "n/a" and rows["a.png"][7] == "n/a"                  # no --clip


def test_sixteen_bit_greyscale_is_read_at_its_full_range(evaluate, tmp_path):
    """Pillow's convert("RGB") clips a 16-bit greyscale PNG's values above 255: the picture read all white."""
    levels = np.linspace(0, 65535, SIZE * SIZE).reshape(SIZE, SIZE).astype(np.uint16)
    Image.fromarray(levels).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    image = evaluate.read_image(tmp_path / "deep.png")
    assert image.shape == (1, 3, SIZE, SIZE)
    torch.testing.assert_close(image[0, 1], torch.from_numpy(levels / 65535).float())


def test_an_rgba_mask_is_read_by_its_colour_not_as_all_edited(evaluate, tmp_path):
    """A white-on-black mask saved with an opaque alpha channel read as alpha alone: all edited, no background."""
    _make_case(tmp_path / "case", {"a.png": _untouched()}, mask_mode="RGBA")
    mask = evaluate.read_mask(tmp_path / "case" / "mask.png")
    assert mask.sum() == 64 and mask[0, BOX[0], BOX[2]] == 1 and mask[0, 0, 0] == 0
    # white strokes on a transparent background: the strokes, as before
    strokes = np.zeros((SIZE, SIZE, 4), np.uint8)
    strokes[2:5, 3:9] = 255
    Image.fromarray(strokes, "RGBA").save(tmp_path / "strokes.png")
    assert evaluate.read_mask(tmp_path / "strokes.png").sum() == 18


def test_an_all_black_mask_is_refused_naming_the_file(evaluate, tmp_path):
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(tmp_path / "mask.png")
    with pytest.raises(BlendedInputError, match=r"mask\.png is all black"):
        evaluate.read_mask(tmp_path / "mask.png")


def test_a_phone_jpeg_is_read_upright_as_load_image_shows_it(evaluate, tmp_path):
    """A JPEG stored sideways with an EXIF orientation: ComfyUI's Load Image turns it upright, so must we."""
    stored = np.zeros((8, 24, 3), np.uint8)  # stored 24 wide, 8 high; EXIF 6 = shown rotated 90 degrees
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif.tobytes())
    assert evaluate.read_image(tmp_path / "phone.jpg").shape == (1, 3, 24, 8)


def test_broken_cases_are_reported_by_name_and_the_others_still_scored(evaluate, tmp_path, capsys, caplog):
    cases = tmp_path / "cases"
    _make_case(cases / "a_good", {"a.png": _untouched()})
    _make_case(cases / "b_other_size", {"a.png": _untouched(), "b.png": np.zeros((8, 8, 3), np.uint8)})
    _make_case(cases / "c_no_mask", {"a.png": _untouched()})
    (cases / "c_no_mask" / "mask.png").unlink()
    _make_case(cases / "d_unreadable", {"a.png": _untouched()})
    (cases / "d_unreadable" / "results" / "b.png").write_bytes(b"not an image")
    _make_case(cases / "e_folder_named_png", {"a.png": _untouched()})
    (cases / "e_folder_named_png" / "results" / "sub.png").mkdir()  # a folder is no result
    assert evaluate.main([str(cases)]) == 1
    out = capsys.readouterr().out
    assert "== " + str(cases / "a_good") in out and "== " + str(cases / "e_folder_named_png") in out
    assert "b_other_size" not in out and "c_no_mask" not in out and "d_unreadable" not in out
    assert f"{cases / 'b_other_size' / 'results' / 'b.png'} is 8x8, but the input is 16x16" in caplog.text
    assert "c_no_mask has no mask.png" in caplog.text
    assert "cannot read " + str(cases / "d_unreadable" / "results" / "b.png") in caplog.text
    assert "3 of 5 case(s) could not be scored" in caplog.text


def test_a_named_folder_without_cases_fails_the_run(evaluate, tmp_path, capsys, caplog):
    """One mistyped or mis-laid-out folder among several: the run said nothing of it and succeeded."""
    _make_case(tmp_path / "good", {"a.png": _untouched()})
    _make_case(tmp_path / "jpeg_input" / "case", {"a.png": _untouched()})
    (tmp_path / "jpeg_input" / "case" / "image.png").rename(tmp_path / "jpeg_input" / "case" / "image.jpg")
    assert evaluate.main([str(tmp_path / "good"), str(tmp_path / "typo"), str(tmp_path / "jpeg_input")]) == 1
    assert "== " + str(tmp_path / "good") in capsys.readouterr().out
    assert f"{tmp_path / 'typo'}: no such folder" in caplog.text
    assert f"{tmp_path / 'jpeg_input' / 'case'}: not scored, it has no image.png" in caplog.text
    (tmp_path / "empty").mkdir()
    assert evaluate.main([str(tmp_path / "typo")]) == 1 and evaluate.main([str(tmp_path / "empty")]) == 1
    assert f"{tmp_path / 'empty'}: no case in it" in caplog.text


def test_a_case_without_its_input_among_good_ones_fails_the_run(evaluate, tmp_path, capsys, caplog):
    """The README: a case that cannot be scored is reported by name and the exit status is then 1; one whose input
    is missing was only warned about, and the run succeeded on the others."""
    _make_case(tmp_path / "cases" / "a", {"a.png": _untouched()})
    _make_case(tmp_path / "cases" / "b", {"a.png": _untouched()})
    (tmp_path / "cases" / "b" / "image.png").unlink()
    assert evaluate.main([str(tmp_path / "cases")]) == 1
    assert "== " + str(tmp_path / "cases" / "a") in capsys.readouterr().out
    assert f"{tmp_path / 'cases' / 'b'}: not scored" in caplog.text and "1 of 2 case(s)" in caplog.text


def test_a_notepad_prompt_with_a_byte_order_mark_is_read_without_it(evaluate, tmp_path, monkeypatch):
    _make_case(tmp_path / "case", {"a.png": _untouched()})
    (tmp_path / "case" / "prompt.txt").write_bytes("a red rock\r\n".encode("utf-8-sig"))
    seen = {}

    def score_edits(*args, prompt=None, **kwargs):
        seen["prompt"] = prompt
        raise BlendedInputError("stop here")
    monkeypatch.setattr(evaluate.metrics, "score_edits", score_edits)
    with pytest.raises(BlendedInputError):
        evaluate.score_case(tmp_path / "case")
    assert seen["prompt"].strip() == "a red rock"


def test_model_options_that_cannot_load_say_what_to_do_and_exit_1(evaluate, tmp_path, monkeypatch, caplog):
    _make_case(tmp_path / "case", {"a.png": _untouched()})
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "no-hub"))  # no VGG16 weights there
    assert evaluate.main([str(tmp_path / "case"), "--lpips"]) == 1
    assert "LPIPS needs" in caplog.text and "run without --lpips" in caplog.text
    assert "CLIP Guidance" not in caplog.text  # the node's way out means nothing here
    (tmp_path / "not-clip.safetensors").write_text("hello", encoding="utf-8")
    assert evaluate.main([str(tmp_path / "case"), "--clip", str(tmp_path / "not-clip.safetensors")]) == 1
    assert "not-clip.safetensors" in caplog.records[-1].getMessage()


def test_a_ring_width_below_one_is_an_argument_error(evaluate, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([str(tmp_path), "--ring-width", "0"])
    assert exit_info.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_the_readme_command_prints_a_unicode_case_to_a_non_utf8_stdout(tmp_path):
    """README's command; its output redirected to a file on Windows is in a legacy code page: a case folder
    named in another script ended the run with UnicodeEncodeError."""
    _make_case(tmp_path / "cases" / "猫 cat", {"a.png": _untouched()})
    environment = dict(os.environ, PYTHONPATH=".", PYTHONIOENCODING="cp1252")
    result = subprocess.run([sys.executable, "scripts/evaluate.py", str(tmp_path / "cases")], cwd=REPO,
                            env=environment, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
    assert b"\\u732b cat" in result.stdout and b"a.png" in result.stdout


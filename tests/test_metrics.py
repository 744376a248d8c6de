"""Edit metrics on synthetic inputs whose scores are known in advance."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from blended import metrics
from blended.clip_model import load_guidance_clip
from blended.errors import BlendedInputError
from blended.prompts import parse_prompt_lines

CLIP_DIR = Path(__file__).parent / "fixtures" / "reference" / "clip_tiny"
PROMPT = "a red rock"


@pytest.fixture(scope="module")
def clip():
    return load_guidance_clip(CLIP_DIR / "model.safetensors")


def _photo(batch=1, size=48, seed=0):
    """A smooth random image (low-frequency noise): natural-looking edges, no flat areas."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 6, 6, generator=gen)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def _mask(size=48, box=(12, 36, 16, 40)):
    mask = torch.zeros(1, size, size)
    mask[:, box[0]:box[1], box[2]:box[3]] = 1
    return mask


def test_an_unchanged_image_has_a_perfect_background_and_no_seam(clip):
    image, mask = _photo(), _mask()
    scores = metrics.score_edits(image.clone(), image, mask, clip=clip, prompt=PROMPT)
    assert scores.background_mse == [0.0]
    assert scores.background_psnr == [math.inf]
    assert scores.seam_gradient == [0.0] and scores.seam_colour == [0.0]
    assert -1 <= scores.clip_similarity[0] <= 1
    assert math.isnan(scores.batch_diversity) and math.isnan(scores.diversity[0])  # one image: no pairs
    assert math.isnan(scores.background_lpips[0])  # no LPIPS model given: not measured
    assert "inf" in scores.table() and "n/a" in scores.table()


def test_background_error_has_the_known_psnr_and_ignores_the_edited_region():
    image, mask = _photo(size=32), _mask(32, (8, 24, 8, 24))
    result = image.clone()
    result[..., mask[0] > 0] = torch.rand_like(result[..., mask[0] > 0])    # the edit: anything goes
    shifted = result.clone()
    shifted[..., mask[0] == 0] += 0.1                                      # background off by 0.1
    scores = metrics.score_edits(torch.cat([result, shifted]), image, mask)
    assert scores.background_mse[0] == 0.0 and scores.background_psnr[0] == math.inf
    assert scores.background_mse[1] == pytest.approx(0.01, rel=1e-4)
    assert scores.background_psnr[1] == pytest.approx(20.0, abs=1e-3)


def test_a_tinted_paste_has_the_tint_as_its_colour_seam_and_a_gradient_jump():
    image = torch.full((1, 3, 32, 32), 0.5)
    image[:, 0] = torch.linspace(0.2, 0.8, 32)  # a smooth horizontal ramp in red
    mask = _mask(32, (8, 24, 8, 24))
    tinted = image.clone()
    tinted[..., 8:24, 8:24] += torch.tensor([0.0, 0.2, -0.1]).view(1, 3, 1, 1)
    scores = metrics.score_edits(torch.cat([tinted, image.clone()]), image, mask)
    # the colour step across the border is exactly the tint: (0 + 0.2 + 0.1) / 3
    assert scores.seam_colour[0] == pytest.approx(0.1, abs=1e-5)
    assert scores.seam_gradient[0] > 0.02
    # the same content without the tint: no seam at all
    assert scores.seam_colour[1] == 0.0 and scores.seam_gradient[1] == 0.0


def test_a_hard_seam_scores_worse_than_a_soft_one():
    image, mask = _photo(size=48), _mask()
    edit = image.flip(-1)  # other content, same statistics
    hard = image * (1 - mask) + edit * mask
    soft_mask = F.avg_pool2d(F.pad(mask[None], (3, 3, 3, 3), mode="replicate"), 7, stride=1)[0]
    soft = image * (1 - soft_mask) + edit * soft_mask
    g_hard = metrics.score_edits(hard, image, mask).seam_gradient[0]
    g_soft = metrics.score_edits(soft, image, (soft_mask > 0).float()).seam_gradient[0]
    assert g_hard > g_soft


def test_identical_results_have_zero_diversity_and_different_ones_do_not(clip):
    image, mask = _photo(), _mask()
    same = image.expand(3, -1, -1, -1).clone()
    scores = metrics.score_edits(same, image, mask, clip=clip, prompt=PROMPT)
    assert scores.batch_diversity == 0.0 and scores.diversity == [0.0, 0.0, 0.0]
    assert scores.clip_similarity[0] == pytest.approx(scores.clip_similarity[2], abs=1e-6)
    varied = torch.cat([image, _photo(seed=1), _photo(seed=2)])
    scores = metrics.score_edits(varied, image, mask, clip=clip, prompt=PROMPT)
    assert scores.batch_diversity > 1e-5  # tiny random CLIP: small but far above float noise


def test_diversity_and_similarity_are_the_documented_formulas(clip):
    image, mask = _photo(), _mask()
    results = torch.cat([_photo(seed=3), _photo(seed=4)])
    scores = metrics.score_edits(results, image, mask, clip=clip, prompt=PROMPT)
    # by hand: the 24x24 box is already square; grey outside the mask, resized to CLIP's 32 px
    crop = (results * mask[:, None] + 0.5 * (1 - mask[:, None]))[..., 12:36, 16:40]
    views = F.interpolate(crop, size=(32, 32), mode="bilinear", align_corners=False)
    with torch.no_grad():
        embeds = F.normalize(clip.encode_image(clip.normalize(views)), dim=-1)
    text = F.normalize(clip.text_embedding(PROMPT), dim=-1)
    torch.testing.assert_close(torch.tensor(scores.clip_similarity), (embeds * text).sum(-1), atol=1e-5, rtol=0)
    cosine = float((embeds[0] * embeds[1]).sum())
    assert scores.batch_diversity == pytest.approx(1 - cosine, abs=1e-5)
    assert scores.diversity == pytest.approx([1 - cosine] * 2, abs=1e-5)


def test_a_weighted_prompt_line_scores_the_weighted_sum_of_its_parts(clip):
    """As the Sampler reads the line: the part steered away from counts against the edit, not as text."""
    embeds = F.normalize(torch.randn(3, clip.text_embedding("x").shape[-1], generator=torch.Generator().manual_seed(2)),
                         dim=-1)
    rock, blurry = (metrics.clip_similarity(clip, embeds, [text]) for text in ("a red rock", "blurry"))
    weighted = metrics.clip_similarity(clip, embeds, ["a red rock | blurry:-0.5"])
    torch.testing.assert_close(weighted, rock - 0.5 * blurry, atol=1e-6, rtol=0)
    per_image = metrics.clip_similarity(clip, embeds, ["a red rock", "blurry:2", "a red rock:0.5 | blurry"])
    torch.testing.assert_close(per_image, torch.stack([rock[0], 2 * blurry[1], 0.5 * rock[2] + blurry[2]]),
                               atol=1e-6, rtol=0)


def test_clip_similarity_ignores_the_background(clip):
    image, mask = _photo(), _mask()
    edit = _photo(seed=5)
    a = image * (1 - mask) + edit * mask
    b = _photo(seed=6) * (1 - mask) + edit * mask
    s = metrics.score_edits(torch.cat([a, b]), torch.cat([image, image]), mask, clip=clip, prompt=PROMPT)
    assert s.clip_similarity[0] == pytest.approx(s.clip_similarity[1], abs=1e-6)
    assert s.batch_diversity == pytest.approx(0.0, abs=1e-6)


def test_lpips_is_measured_on_the_background_only():
    calls = []

    def fake_lpips(x, y):  # stands in for lpips.LPIPS: [-1,1] inputs, one distance per image
        calls.append((x.min().item(), x.max().item()))
        return (x - y).abs().flatten(1).mean(1).view(-1, 1, 1, 1)

    image, mask = _photo(size=32) * 0.8, _mask(32, (8, 24, 8, 24))  # room for the shift below 1
    result = image.clone()
    result[..., 8:24, 8:24] = 1.0
    shifted = result.clone()
    shifted[..., mask[0] == 0] += 0.1  # the background off by 0.1 (0.2 in LPIPS's [-1,1] range)
    scores = metrics.score_edits(torch.cat([result, shifted]), image, mask, lpips_model=fake_lpips)
    assert scores.background_lpips[0] == 0.0  # the edit is blacked out in both images
    # The result is compared with the input, not with itself: the kept 3/4 of the pixels differ by 0.2.
    assert scores.background_lpips[1] == pytest.approx(0.2 * 0.75, rel=1e-4)
    assert calls and calls[0][0] >= -1 and calls[0][1] <= 1


def test_results_are_paired_with_their_input_and_prompt():
    inputs = torch.cat([_photo(seed=7), _photo(seed=8)])
    mask = _mask()
    # the sampler's order: both results of input 0, then both of input 1
    results = inputs.repeat_interleave(2, dim=0)
    scores = metrics.score_edits(results, inputs, mask)
    assert scores.background_psnr == [math.inf] * 4
    assert metrics.split_prompts("a\nb", 4) == ["a", "a", "b", "b"]
    # Lines of only invisible characters (a pasted byte-order mark, a zero-width space) are no prompt lines, as
    # CLIP Guidance counts them: the same text gives both nodes the same lines.
    pasted = "\ufeff\na\n\u200b\n \t\nb\n"
    assert metrics.split_prompts(pasted, 4) == ["a", "a", "b", "b"]
    assert len(parse_prompt_lines(pasted)) == 2
    with pytest.raises(BlendedInputError, match="multiple"):
        metrics.score_edits(results[:3], inputs, mask)
    with pytest.raises(BlendedInputError, match="same size"):
        metrics.score_edits(results[..., :40], inputs, mask)
    with pytest.raises(BlendedInputError, match="empty"):
        metrics.score_edits(results, inputs, torch.zeros(1, 48, 48))


def test_prompt_lines_are_paired_with_images_in_the_samplers_order(clip, diffusion, monkeypatch):
    # Two inputs, two prompt lines, two results each: the sampler's output order is input, then prompt line, then
    # result, and the similarity of each image is measured against the line that image was made for.
    from blended.sampler import SamplerSettings, edit_image
    from conftest import tiny_unet

    unet = tiny_unet()
    size = unet.config.image_size
    inputs, mask = _photo(batch=2, size=size, seed=3), _mask(size, (16, 48, 16, 48))
    prompt = "a red rock\na blue sky"
    settings = SamplerSettings(skip_timesteps=diffusion.num_timesteps - 1, batch_size=4)
    edited = edit_image(inputs.movedim(1, -1), mask, unet, diffusion, clip, prompt.splitlines(), seed=0,
                        num_results=2, settings=settings)
    assert metrics.split_prompts(prompt, 8, inputs=2) == edited.prompts
    measured = []
    real_similarity = metrics.clip_similarity
    monkeypatch.setattr(metrics, "clip_similarity", lambda c, e, lines: measured.append(lines) or
                        real_similarity(c, e, lines))
    results = edited.images.movedim(-1, 1)
    metrics.score_edits(results, inputs, edited.mask, clip=clip, prompt=prompt)
    assert measured == [edited.prompts]
    # One input image, or one per result: the lines cover equal groups of the batch in order, as before.
    metrics.score_edits(results[:4], inputs[:1], mask, clip=clip, prompt=prompt)
    metrics.score_edits(results, inputs.repeat_interleave(4, dim=0), edited.mask, clip=clip, prompt=prompt)
    assert measured[1:] == [["a red rock"] * 2 + ["a blue sky"] * 2, ["a red rock"] * 4 + ["a blue sky"] * 4]
    with pytest.raises(BlendedInputError, match="3 prompt lines for 4 images per input image"):
        metrics.split_prompts("a\nb\nc", 8, inputs=2)


def test_masks_beyond_the_images_do_not_count_as_inputs(clip, monkeypatch):
    """Two images with four masks: the Sampler keeps the first two masks, so there are two inputs, not four."""
    measured = []
    real_similarity = metrics.clip_similarity
    monkeypatch.setattr(metrics, "clip_similarity", lambda c, e, lines: measured.append(lines) or
                        real_similarity(c, e, lines))
    inputs = torch.cat([_photo(seed=1), _photo(seed=2)])
    metrics.score_edits(inputs.repeat_interleave(4, dim=0), inputs, _mask().expand(4, -1, -1), clip=clip,
                        prompt="a\nb")
    assert measured == [["a", "a", "b", "b", "a", "a", "b", "b"]]
    with pytest.raises(BlendedInputError, match="needs a prompt"):
        metrics.clip_similarity(clip, torch.zeros(2, 8), [""])


def test_one_picture_edited_with_several_masks_pairs_lines_as_the_sampler(clip, diffusion, monkeypatch):
    """The Sampler edits one picture with each mask of a batch, each mask an input with its group of results."""
    from blended.sampler import SamplerSettings, edit_image
    from conftest import tiny_unet

    unet = tiny_unet()
    size = unet.config.image_size
    picture = _photo(size=size, seed=3)
    masks = torch.cat([_mask(size, (8, 24, 8, 24)), _mask(size, (30, 50, 30, 50))])
    prompt = "a red rock\na blue sky"
    settings = SamplerSettings(skip_timesteps=diffusion.num_timesteps - 1, batch_size=4)
    edited = edit_image(picture.movedim(1, -1), masks, unet, diffusion, clip, prompt.splitlines(), seed=0,
                        num_results=2, settings=settings)
    measured = []
    real_similarity = metrics.clip_similarity
    monkeypatch.setattr(metrics, "clip_similarity", lambda c, e, lines: measured.append(lines) or
                        real_similarity(c, e, lines))
    metrics.score_edits(edited.images.movedim(-1, 1), picture, masks, clip=clip, prompt=prompt)
    assert measured == [edited.prompts] and edited.prompts[2] == "a blue sky"


def test_the_table_has_a_row_per_image_a_mean_and_the_directions():
    image, mask = _photo(), _mask()
    shifted = image + 0.05 * (1 - mask[:, None])
    table = metrics.score_edits(torch.cat([image, shifted.clamp(0, 1)]), image, mask).table(["a.png", "b.png"])
    lines = table.splitlines()
    assert "PSNR dB (+)" in lines[0] and "seam grad (-)" in lines[0]
    assert lines[2].lstrip().startswith("a.png") and lines[3].lstrip().startswith("b.png")
    assert lines[4].lstrip().startswith("mean")
    assert "batch diversity" in lines[-1]


def _save(tensor, path):
    import numpy as np
    from PIL import Image
    array = (tensor.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path)


def test_evaluate_script_scores_a_folder_of_edits(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate", Path(__file__).parent.parent / "scripts" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)

    case = tmp_path / "cases" / "square"
    (case / "results").mkdir(parents=True)
    image, mask = _photo(), _mask()
    _save(image[0], case / "image.png")
    _save(mask, case / "mask.png")
    (case / "prompt.txt").write_text(PROMPT + "\n", encoding="utf-8")
    _save(image[0], case / "results" / "a_unchanged.png")
    tinted = image[0].clone()
    tinted[:, 12:36, 16:40] = (tinted[:, 12:36, 16:40] + 0.2).clamp(0, 1)
    _save(tinted, case / "results" / "b_tinted.png")

    assert evaluate.main([str(tmp_path / "cases"), "--clip", str(CLIP_DIR / "model.safetensors")]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()[:2] in ("a_", "b_")}
    assert rows["a_unchanged.png"][2] == "inf"                     # PSNR of the untouched image
    assert rows["b_tinted.png"][2] == "inf"                        # the tint is inside the mask only
    assert float(rows["a_unchanged.png"][6]) == 0.0                # no colour seam
    assert float(rows["b_tinted.png"][6]) > 0.1                    # the tint's colour step
    assert "batch diversity" in out
    assert evaluate.main([str(tmp_path / "nothing")]) == 1


@pytest.mark.parametrize(("inputs", "masks"), [(1, 1), (2, 1), (1, 3), (6, 6)])
def test_scores_per_result_equal_the_definitions_on_copies_of_the_inputs(inputs, masks):
    """score_edits measures each result against its own input and mask without copying them per result, and the
    seam inside the ring's box only: the same numbers as the plain definitions on the batch-sized copies."""
    generator = torch.Generator().manual_seed(5)
    results = torch.rand(6, 3, 36, 44, generator=generator)
    reference = torch.rand(inputs, 3, 36, 44, generator=generator)
    mask = torch.zeros(masks, 36, 44)
    for item in range(masks):
        mask[item, 4 + 3 * item:20 + 2 * item, 6:30 + item] = 1
    mask[-1, 30:, 40:] = 1  # a second region touching the corner

    class SquaredError:  # stands in for LPIPS: any per-image distance of [-1,1] images
        def __call__(self, x, y):
            return ((x - y) ** 2).flatten(1).mean(dim=1)
    scores = metrics.score_edits(results, reference, mask, lpips_model=SquaredError())
    full_results, full_reference, edited = metrics.prepare(results, reference, mask)
    gradient, colour = metrics.seam_scores(full_results, full_reference, edited)
    torch.testing.assert_close(torch.tensor(scores.seam_gradient), gradient, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(scores.seam_colour), colour, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(scores.background_mse),
                               metrics.background_mse(full_results, full_reference, edited))
    torch.testing.assert_close(torch.tensor(scores.background_lpips),
                               metrics.background_lpips(SquaredError(), full_results, full_reference, edited))


def test_a_mask_covering_the_whole_picture_scores_no_seam():
    """A whole-image edit (the Sampler without a mask) has no border to measure: seam 0, no background."""
    generator = torch.Generator().manual_seed(2)
    results, reference = torch.rand(2, 3, 20, 24, generator=generator), torch.rand(1, 3, 20, 24, generator=generator)
    scores = metrics.score_edits(results, reference, torch.ones(1, 20, 24))
    assert scores.seam_gradient == [0.0, 0.0] and scores.seam_colour == [0.0, 0.0]
    assert all(math.isnan(v) for v in scores.background_mse)


CLIP_COLUMNS = ("clip_similarity", "diversity")


def _assert_same(a: metrics.EditScores, b: metrics.EditScores) -> None:
    """Pixel and LPIPS scores bit for bit (NaN equal to NaN); CLIP's to float32 rounding: CLIP embedding another
    number of views at once rounds its matmuls differently (9e-8 on the unit embeddings, measured)."""
    for name, _, _ in metrics.EditScores.COLUMNS:
        tolerance = {"atol": 1e-6, "rtol": 0} if name in CLIP_COLUMNS else {"atol": 0, "rtol": 0}
        torch.testing.assert_close(torch.tensor(getattr(a, name), dtype=torch.float64),
                                   torch.tensor(getattr(b, name), dtype=torch.float64), equal_nan=True, **tolerance)
    assert a.batch_diversity == pytest.approx(b.batch_diversity, abs=1e-6)


class _RecordingDistance:
    """Stands in for LPIPS (not installed here): a per-image distance of [-1,1] images; records the batches."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, y):
        self.batches.append(x.shape[0])
        return ((x - y) ** 2).flatten(1).mean(dim=1)


def _many_results(batch=7, size=40):
    """``batch`` results of two inputs' masks (the Sampler's order), and one input picture."""
    generator = torch.Generator().manual_seed(12)
    results, picture = torch.rand(batch + 1, 3, size, size, generator=generator).split([batch, 1])
    masks = torch.zeros(batch, size, size)
    masks[:, 6:30, 8:34] = 1
    return results, picture, masks


def test_scores_in_chunks_equal_the_scores_of_one_call(clip, monkeypatch):
    """CLIP embeds a few views at a time and LPIPS compares fewer results the larger they are: every score is
    the one a single call doing everything at once gives (CLIP's to float32 rounding, the others bit for bit)."""
    results, picture, masks = _many_results()
    monkeypatch.setattr(metrics, "VIEW_CHUNK", 100)
    monkeypatch.setattr(metrics, "LPIPS_CHUNK", 100)
    monkeypatch.setattr(metrics, "LPIPS_PIXELS", 100 * 40 * 40)
    whole_lpips = _RecordingDistance()
    whole = metrics.score_edits(results, picture, masks, clip=clip, prompt=PROMPT, lpips_model=whole_lpips)
    assert whole_lpips.batches == [7]
    monkeypatch.setattr(metrics, "VIEW_CHUNK", 3)
    monkeypatch.setattr(metrics, "LPIPS_PIXELS", 2 * 40 * 40)  # two results' pixels at a time
    chunked_lpips, encoded = _RecordingDistance(), []
    encode = clip.encode_image
    monkeypatch.setattr(clip, "encode_image", lambda x: encoded.append(len(x)) or encode(x))
    chunked = metrics.score_edits(results, picture, masks, clip=clip, prompt=PROMPT, lpips_model=chunked_lpips)
    _assert_same(chunked, whole)
    assert chunked_lpips.batches == [2, 2, 2, 1]
    assert encoded == [3, 3, 1], "CLIP embeds the views a chunk at a time, not all results at once"


def test_lpips_runs_where_its_model_is():
    """The node puts LPIPS on ComfyUI's device: the images (CPU, as the node reads them) go to it a chunk at a
    time, and the distances come back to the CPU."""
    seen = []

    class OnMeta(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1, device="meta"))

        def forward(self, x, y):
            seen.append((x.device.type, y.device.type))
            return torch.zeros(x.shape[0])

    results, picture, masks = _many_results(batch=2)
    assert metrics.score_edits(results, picture, masks, lpips_model=OnMeta()).background_lpips == [0.0, 0.0]
    assert seen == [("meta", "meta")]


def test_pairwise_distances_hold_a_block_of_rows_at_a_time(monkeypatch):
    """Diversity needs every pair, but not every pair's difference at once ([B,B,D]: 48 GiB for 4096 results
    of ViT-L/14): the distances are the definition's, bit for bit, from blocks of at most the budget."""
    embeds = F.normalize(torch.randn(64, 32, generator=torch.Generator().manual_seed(3)), dim=-1)
    definition = ((embeds[:, None, :] - embeds[None, :, :]) ** 2).sum(dim=-1) / 2
    monkeypatch.setattr(metrics, "PAIRWISE_ELEMENTS", 8 * 64 * 32)
    from test_rank import largest_tensor
    (per_image, batch), largest = largest_tensor(lambda: metrics.diversity(embeds))
    assert largest <= 8 * 64 * 32 * 4
    assert torch.equal(metrics.pairwise_distances(embeds), definition)
    assert torch.equal(per_image, definition.sum(dim=1) / 63) and batch == float(definition.sum() / (64 * 63))


def test_scoring_reports_each_result_of_each_pass_and_stops_when_the_callback_raises(clip, monkeypatch):
    """One bar over the pixel pass, LPIPS and CLIP (7 results each: 21); the node's callback raises on Cancel."""
    results, picture, masks = _many_results()
    monkeypatch.setattr(metrics, "VIEW_CHUNK", 4)
    monkeypatch.setattr(metrics, "LPIPS_PIXELS", 2 * 40 * 40)
    seen = []
    metrics.score_edits(results, picture, masks, clip=clip, prompt=PROMPT, lpips_model=_RecordingDistance(),
                        progress=lambda done, total: seen.append((done, total)))
    assert [done for done, _ in seen] == list(range(1, 8)) + [9, 11, 13, 14] + [18, 21]
    assert {total for _, total in seen} == {21}
    lpips = _RecordingDistance()

    class Cancelled(Exception):
        pass

    def cancel_at_lpips(done, total):
        if done > 7:
            raise Cancelled
    with pytest.raises(Cancelled):
        metrics.score_edits(results, picture, masks, clip=clip, prompt=PROMPT, lpips_model=lpips,
                            progress=cancel_at_lpips)
    assert lpips.batches == [2]

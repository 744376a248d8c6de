"""Ranking by un-augmented CLIP distance: known orders, mask conventions, input checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from blended import rank
from blended.clip_model import load_guidance_clip
from blended.errors import BlendedInputError
from blended.losses import spherical_distance
from blended.rank import EMBED_CHUNK, RANK_MODES, chunk_size, chunks, clip_scores, image_embeddings, rank_by_clip
from conftest import REF

CLIP_DIR = REF / "clip_tiny"
PROMPT = "a red rock"


@pytest.fixture(scope="module")
def clip():
    return load_guidance_clip(CLIP_DIR / "model.pt")


def _rand(shape, seed):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _optimised_toward_prompt(clip, steps_per_image, seed=0):
    """The same start image optimised for different numbers of steps: more steps = closer to the prompt."""
    text = clip.text_embedding(PROMPT)
    start = torch.logit(_rand((1, 3, 32, 32), seed).clamp(0.05, 0.95))
    results = []
    for steps in steps_per_image:
        logits = start.clone().requires_grad_(True)
        optimiser = torch.optim.Adam([logits], lr=0.05)
        for _ in range(steps):
            optimiser.zero_grad()
            x = torch.sigmoid(logits)
            spherical_distance(clip.encode_image(clip.normalize(x)), text).sum().backward()
            optimiser.step()
        results.append(torch.sigmoid(logits).detach())
    return torch.cat(results)


def test_ranking_recovers_how_far_each_image_was_optimised(clip):
    steps = [3, 0, 25, 10]  # best is index 2 (most steps), then 3, 0, 1
    images = _optimised_toward_prompt(clip, steps)
    order, distances = rank_by_clip(clip, images, PROMPT, mode="guidance view")
    assert order.tolist() == [2, 3, 0, 1]
    assert distances.dtype == torch.float32 and distances.shape == (4,)
    # margins far above float noise (tiny random CLIP: each step moves the distance by ~1e-3)
    assert (distances[[3, 0, 1]] - distances[[2, 3, 0]]).min() > 2e-3
    # larger images are resized to CLIP's size first; the order survives
    big = F.interpolate(images, scale_factor=2, mode="nearest")
    assert rank_by_clip(clip, big, PROMPT, mode="guidance view")[0].tolist() == [2, 3, 0, 1]


def test_scores_equal_the_unaugmented_distance(clip):
    images = _rand((2, 3, 64, 64), 1)
    text = clip.text_embedding(PROMPT)
    small = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    expected = spherical_distance(clip.encode_image(clip.normalize(small)), text)
    torch.testing.assert_close(clip_scores(clip, images, PROMPT, mode="guidance view"), expected)
    torch.testing.assert_close(clip_scores(clip, images, text, mode="guidance view"), expected)
    # the default is the original's: no antialiasing, no CLIP normalisation
    plain = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False, antialias=False)
    expected_original = spherical_distance(clip.encode_image(plain), text)
    torch.testing.assert_close(clip_scores(clip, images, PROMPT), expected_original, atol=0, rtol=0)
    torch.testing.assert_close(clip_scores(clip, images, PROMPT, mode="original"), expected_original,
                               atol=0, rtol=0)


def test_an_unknown_mode_is_refused(clip):
    """The former "normalized" switch is no mode: CLIP Rank maps an old workflow's saved value to one."""
    images = _rand((2, 3, 64, 64), 7)
    with pytest.raises(BlendedInputError, match="ranking mode"):
        clip_scores(clip, images, PROMPT, mode="normalized")
    with pytest.raises(BlendedInputError, match="ranking mode"):
        image_embeddings(clip, images, mode="normalized")


def test_image_embeddings_see_what_the_ranking_sees(clip):
    """Image targets are embedded in the guidance view by default; each mode's embeddings give its distances."""
    images, mask = _rand((2, 3, 64, 64), 8), _mask()
    torch.testing.assert_close(image_embeddings(clip, images, mask),
                               image_embeddings(clip, images, mask, mode="guidance view"), atol=0, rtol=0)
    text = clip.text_embedding(PROMPT)
    for mode in RANK_MODES:
        torch.testing.assert_close(spherical_distance(image_embeddings(clip, images, mask, mode=mode), text),
                                   clip_scores(clip, images, PROMPT, mask=mask, mode=mode), atol=0, rtol=0)


def _mask(batch=1):
    mask = torch.zeros(batch, 1, 64, 64)
    mask[..., 8:40, 16:56] = 1
    return mask


def test_masked_modes_match_their_conventions(clip):
    images, mask = _rand((2, 3, 64, 64), 2), _mask()
    text = clip.text_embedding(PROMPT)

    def resize(x, antialias):
        return F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=antialias)

    grey_outside = images * mask + 0.5 * (1 - mask)
    expected = spherical_distance(clip.encode_image(clip.normalize(resize(grey_outside, True))), text)
    torch.testing.assert_close(clip_scores(clip, images, PROMPT, mask=mask, mode="guidance view"), expected)
    # the original's ranking: black outside, no CLIP normalisation, no antialiasing (torchvision 0.10)
    expected_original = spherical_distance(clip.encode_image(resize(images * mask, False)), text)
    torch.testing.assert_close(clip_scores(clip, images, PROMPT, mask=mask, mode="original"),
                               expected_original)


@pytest.mark.parametrize("mode", ["original", "guidance view"])
def test_masked_scores_ignore_pixels_outside_the_mask(clip, mode):
    images, mask = _rand((3, 3, 64, 64), 3), _mask(batch=3)
    before = clip_scores(clip, images, PROMPT, mask=mask, mode=mode)
    changed_outside = images * mask + _rand((3, 3, 64, 64), 4) * (1 - mask)
    after = clip_scores(clip, changed_outside, PROMPT, mask=mask[:, 0], mode=mode)
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    changed_inside = images * (1 - mask) + _rand((3, 3, 64, 64), 5) * mask
    assert not torch.allclose(clip_scores(clip, changed_inside, PROMPT, mask=mask, mode=mode),
                              before)


def test_a_prompt_per_image(clip):
    images = _rand((2, 3, 32, 32), 6)
    per_image = clip_scores(clip, images, [PROMPT, "a blue sky"])
    torch.testing.assert_close(per_image[0], clip_scores(clip, images[:1], PROMPT)[0])
    torch.testing.assert_close(per_image[1], clip_scores(clip, images[1:], "a blue sky")[0])
    with pytest.raises(BlendedInputError):
        clip_scores(clip, images, [PROMPT, PROMPT, PROMPT])


def test_a_weighted_prompt_ranks_by_the_weighted_sum_of_its_parts(clip):
    # As the guidance's loss of a line: a negative part pushes away; one plain part is the string's own distance.
    from blended.prompts import parse_prompt

    images, mask = _rand((3, 3, 32, 32), 8), torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    for mode in ("original", "guidance view"):
        weighted = clip_scores(clip, images, parse_prompt("a red rock:1.0 | a blue sky:-0.5"), mask=mask, mode=mode)
        parts = [clip_scores(clip, images, text, mask=mask, mode=mode) for text in ("a red rock", "a blue sky")]
        torch.testing.assert_close(weighted, parts[0] - 0.5 * parts[1], atol=1e-6, rtol=0)
        plain = clip_scores(clip, images, parse_prompt(PROMPT), mask=mask, mode=mode)
        assert torch.equal(plain, clip_scores(clip, images, PROMPT, mask=mask, mode=mode))
    with pytest.raises(BlendedInputError, match="needs a prompt"):
        clip_scores(clip, images, parse_prompt("  "))


def test_bad_inputs_are_refused(clip):
    with pytest.raises(BlendedInputError):
        clip_scores(clip, torch.rand(2, 32, 32, 3), PROMPT)  # channels-last (ComfyUI IMAGE) not converted
    with pytest.raises(BlendedInputError):
        clip_scores(clip, torch.rand(2, 3, 64, 64), PROMPT, mask=torch.ones(1, 1, 32, 32))
    with pytest.raises(BlendedInputError):
        clip_scores(clip, torch.rand(2, 3, 64, 64), 42)


@pytest.mark.parametrize("mode", RANK_MODES)
def test_many_images_embed_a_chunk_at_a_time_with_a_mask_per_group_as_with_a_mask_each(clip, mode):
    generator = torch.Generator().manual_seed(9)
    images = torch.rand(20, 3, 40, 40, generator=generator)
    masks = torch.zeros(4, 40, 40)  # one per group of 5 images, as the Sampler's mask output per input
    for item in range(4):
        masks[item, 5 * item:20 + 4 * item, 8:30] = 1
    grouped = image_embeddings(clip, images, masks, mode=mode)
    each = torch.cat([image_embeddings(clip, images[i:i + 1], masks[i // 5], mode=mode) for i in range(20)])
    torch.testing.assert_close(grouped, each, atol=1e-5, rtol=1e-4)
    with pytest.raises(BlendedInputError, match="equal group"):
        image_embeddings(clip, images, masks[:3], mode=mode)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any torch operation makes: what a device would have to hold at once, measured
    on the CPU from tensor sizes (no GPU needed)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.bytes = max(self.bytes, tensor.numel() * tensor.element_size())
        return out


def largest_tensor(fn):
    """(fn(), bytes of the largest tensor made while it ran)."""
    with _LargestTensor() as largest:
        result = fn()
    return result, largest.bytes


def test_chunks_hold_fewer_images_the_larger_they_are():
    """16 results of 1024x1024 at a time (192 MiB in float32), 4 of 2048x2048, one of 4096x4096, never none."""
    assert [chunk_size(side, side) for side in (256, 1024, 2048, 4096, 16384)] == [EMBED_CHUNK, 16, 4, 1, 1]
    assert chunks(10, 4) == [range(0, 4), range(4, 8), range(8, 10)]


@pytest.mark.parametrize("mode", RANK_MODES)
def test_large_images_reach_clip_a_few_at_a_time_with_the_same_embeddings(clip, mode, monkeypatch):
    """Full-size pixels are what is large: a chunk holds no more of them than the pixel budget, and the
    embeddings are those of one batch (to float32 rounding: CLIP's matmuls may round another batch size
    differently)."""
    images = _rand((6, 3, 64, 64), 10)
    masks = torch.zeros(2, 64, 64)
    masks[0, 8:40, 16:56], masks[1, 20:60, 4:30] = 1, 1
    whole = image_embeddings(clip, images, masks, mode=mode)  # 6 images in one chunk
    monkeypatch.setattr(rank, "EMBED_PIXELS", 2 * 64 * 64)
    chunked, largest = largest_tensor(lambda: image_embeddings(clip, images, masks, mode=mode))
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-5)
    assert largest <= 2 * 3 * 64 * 64 * 4, "more than two images' float32 pixels at once"


def test_ranking_reports_each_chunk_and_stops_when_the_callback_raises(clip, monkeypatch):
    """The node's callback moves ComfyUI's bar and raises on Cancel: the ranking stops at the next chunk."""
    monkeypatch.setattr(rank, "EMBED_CHUNK", 4)
    images, seen = _rand((10, 3, 32, 32), 11), []
    order, distances = rank_by_clip(clip, images, PROMPT, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(4, 10), (8, 10), (10, 10)]
    torch.testing.assert_close(distances, clip_scores(clip, images, PROMPT), atol=1e-6, rtol=0)
    encoded = []
    encode = clip.encode_image
    monkeypatch.setattr(clip, "encode_image", lambda x: encoded.append(len(x)) or encode(x))

    class Cancelled(Exception):
        pass

    def cancel(done, total):
        raise Cancelled
    with pytest.raises(Cancelled):
        rank_by_clip(clip, images, PROMPT, progress=cancel)
    assert encoded == [4]

"""Odd but legitimate IMAGE and MASK tensors, as other nodes hand them over, through ComfyUI's own executor: the
Sampler, CLIP Rank and Edit Metrics either give a sensible result (the right shapes, the background kept where the
Sampler promises it) or stop with the pack's error saying what was wrong and what to do.

The tensors come from a test-only node that outputs whatever tensor a test gives it, so a bf16, strided or
unbatched tensor reaches the pack's node as it would from any upstream node."""

from __future__ import annotations

import itertools
import uuid

import pytest
import torch
from test_node_errors import graph

import harness
from blended.image_io import to_rgb_nchw

pytestmark = pytest.mark.comfy

_TENSORS: dict[str, torch.Tensor] = {}


class _TensorImage:
    """Outputs the tensor registered under ``key`` (a fresh key per tensor: ComfyUI caches outputs by inputs)."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "get"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": ""})}}

    def get(self, key):
        return (_TENSORS[key],)


class _TensorMask(_TensorImage):
    RETURN_TYPES = ("MASK",)


@pytest.fixture
def comfy(comfy_inprocess, monkeypatch):
    """The in-process executor with the two tensor nodes registered for this test only."""
    monkeypatch.setitem(comfy_inprocess.node_class_mappings, "BlendedTest_TensorImage", _TensorImage)
    monkeypatch.setitem(comfy_inprocess.node_class_mappings, "BlendedTest_TensorMask", _TensorMask)
    yield comfy_inprocess
    _TENSORS.clear()


def tensor(value: torch.Tensor, kind: str = "Image"):
    """A graph builder callable (as test_node_errors.graph takes) adding a node that outputs ``value``."""
    key = uuid.uuid4().hex
    _TENSORS[key] = value
    return lambda g: g.node(f"BlendedTest_Tensor{kind}", key=key).out(0)


def mask_tensor(value: torch.Tensor):
    return tensor(value, "Mask")


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _box(batch, height, width):
    mask = torch.zeros(batch, height, width)
    mask[:, height // 4:max(3 * height // 4, height // 4 + 1), width // 4:max(3 * width // 4, width // 4 + 1)] = 1
    return mask


# ------------------------------------------------------------------------------------------------ the Sampler

_frame = torch.zeros(1, 40, 40)
_frame[0, 0, :] = _frame[0, -1, :] = _frame[0, :, 0] = _frame[0, :, -1] = 1  # touches every border
_pixel = torch.zeros(1, 40, 40)
_pixel[0, 9, 17] = 1
SAMPLER_CASES = {
    "one channel": (_rand(1, 40, 40, 1), _box(1, 40, 40), {}),
    "float16": (_rand(1, 40, 40, 3).half(), _box(1, 40, 40).half(), {}),
    "bfloat16": (_rand(1, 40, 40, 3).bfloat16(), _box(1, 40, 40).bfloat16(), {}),
    "float64": (_rand(1, 40, 40, 3).double(), _box(1, 40, 40).double(), {}),
    "permuted view": (_rand(1, 3, 40, 40).permute(0, 2, 3, 1), _box(1, 40, 40).transpose(1, 2), {}),
    "strided view": (_rand(2, 40, 80, 3)[:, :, ::2], _box(1, 40, 80)[:, :, 1::2], {}),
    "mask 0..255": (_rand(1, 40, 40, 3), _box(1, 40, 40) * 255, {}),
    "mask just outside 0..1": (_rand(1, 40, 40, 3), _box(1, 40, 40) * 1.0000001 - 1e-7, {}),
    "one-pixel mask": (_rand(1, 40, 40, 3), _pixel, {}),
    "mask on every border": (_rand(1, 40, 40, 3), _frame, {"region": "mask_crop"}),
    "3 masks, 1 image": (_rand(1, 24, 24, 3), _box(3, 24, 24), {}),
    "3 masks, 2 images": (_rand(2, 24, 24, 3), _box(3, 24, 24), {}),
    "7x300": (_rand(1, 7, 300, 3), _box(1, 7, 300), {"region": "mask_crop"}),
    "3000x5": (_rand(1, 3000, 5, 3), _box(1, 3000, 5), {}),
    "unbatched image, 2-D mask": (_rand(37, 53, 3), _box(1, 37, 53)[0], {}),
}


@pytest.mark.parametrize("case", list(SAMPLER_CASES))
def test_the_sampler_takes_odd_tensors_and_keeps_their_background(comfy, case):
    """One result per input, at the input's size, as float32 RGB; outside the mask the input's own pixels."""
    image, mask, widgets = SAMPLER_CASES[case]
    result = comfy.run(graph(tensor(image), mask_tensor(mask), **widgets))
    images, masks = result.tensors["sampler"][0][0], result.tensors["sampler"][1][0]
    expected = to_rgb_nchw(image.float()).movedim(1, -1)
    inputs = max(expected.shape[0], mask.shape[0] if mask.dim() == 3 and expected.shape[0] == 1 else 1)
    assert images.shape == (inputs, *expected.shape[1:3], 3) and images.dtype == torch.float32
    assert masks.shape == images.shape[:3] and bool(masks.flatten(1).amax(dim=1).gt(0).all())
    kept = (masks == 0)[..., None].expand_as(images)
    assert torch.equal(images[kept], expected.expand(inputs, -1, -1, -1)[kept])


def test_a_negative_grow_mask_that_shrinks_the_mask_away_is_refused(comfy, monkeypatch):
    """grow_mask < 0 (a linked value; the widget stops at 0) shrinks the composite, as feather's error advises; one
    that shrinks it away entirely would give the input back unchanged as if edited. Refused before the models load;
    a smaller shrink still edits its smaller region."""
    def linked_grow(value, mask=None):
        prompt = graph(tensor(_rand(1, 64, 64, 3)), mask_tensor(_box(1, 64, 64) if mask is None else mask))
        prompt["grow"] = {"class_type": "PrimitiveInt", "inputs": {"value": value}}
        prompt["sampler"]["inputs"]["grow_mask"] = ["grow", 0]
        return prompt

    shrunk = comfy.run(linked_grow(-3)).tensors["sampler"][1][0]
    assert 0 < int(shrunk.sum()) < int(_box(1, 64, 64).sum())
    bridge = comfy.pack_module("comfy_bridge")
    loads = []
    monkeypatch.setattr(bridge, "load_for_sampling", lambda *args, **kwargs: loads.append(args))
    with pytest.raises(harness.PromptExecutionError, match="grow_mask -40 shrinks the mask away entirely"):
        comfy.run(linked_grow(-40))
    masks = torch.zeros(2, 64, 64)  # one picture edited in two places: the small one goes at -6
    masks[0, 8:56, 8:56] = 1
    masks[1, 30:34, 30:34] = 1
    with pytest.raises(harness.PromptExecutionError, match=r"grow_mask -6 shrinks .* \(in batch item\(s\) \[1\]\)"):
        comfy.run(linked_grow(-6, masks))
    assert loads == []


@pytest.mark.parametrize("widget,message", [("batch_size", "batch_size must be 0 \\(auto"),
                                            ("capture_every", "capture_every must be 0 \\(no frames\\)")])
def test_a_linked_negative_count_is_refused(comfy, widget, message):
    """A link skips the widget's minimum: -1 results per batch or a frame every -1 steps means nothing."""
    prompt = graph(tensor(_rand(1, 32, 32, 3)), mask_tensor(_box(1, 32, 32)))
    prompt["count"] = {"class_type": "PrimitiveInt", "inputs": {"value": -1}}
    prompt["sampler"]["inputs"][widget] = ["count", 0]
    with pytest.raises(harness.PromptExecutionError, match=message + ".*got -1"):
        comfy.run(prompt)


@pytest.mark.parametrize("case", ["NaN", "2 channels", "8-bit"])
def test_a_bad_image_is_refused_before_the_models_load(comfy, monkeypatch, case):
    """What is wrong with the image alone is said before the models are loaded (seconds, for a 2.2 GB UNet)."""
    image = _rand(1, 32, 32, 3)
    if case == "NaN":
        image[0, 3, 3, 1] = float("nan")
    elif case == "2 channels":
        image = image[..., :2]
    else:
        image = (image * 255).to(torch.uint8)
    bridge = comfy.pack_module("comfy_bridge")
    loads = []
    monkeypatch.setattr(bridge, "load_for_sampling", lambda *args, **kwargs: loads.append(args))
    with pytest.raises(harness.PromptExecutionError, match={"NaN": "NaN", "2 channels": "2 channels",
                                                              "8-bit": "divide 8-bit values by 255"}[case]):
        comfy.run(graph(tensor(image), mask_tensor(_box(1, 32, 32))))
    assert loads == []


def test_an_inverted_mask_whose_black_area_vanishes_at_the_image_s_size_says_so(comfy):
    """A 2-pixel black hole in a 1024x1024 mask is gone at a 16x16 image's size: the error says why, rather than
    that the mask has no black pixel."""
    mask = torch.ones(1, 1024, 1024)
    mask[0, 700:702, 700:702] = 0
    with pytest.raises(harness.PromptExecutionError) as err:
        comfy.run(graph(tensor(_rand(1, 16, 16, 3)), mask_tensor(mask), invert_mask=True))
    message = str(err.value)
    assert "its black area vanishes when the 1024x1024 mask is shrunk to the image's 16x16" in message
    assert "has no black pixel" not in message


# ------------------------------------------------------------------------------------------------ CLIP Rank


def rank_graph(images, top_k=1, mask=None):
    g = harness.graph_builder()
    clip = g.node("BlendedDiffusion_LoadCLIP", clip_name=harness.CLIP_TINY_NAME, dtype="float32")
    inputs = {} if mask is None else {"mask": mask(g)}
    rank = g.node("BlendedDiffusion_CLIPRank", id="rank", images=images(g), clip=clip.out(0), prompt="a red rock",
                  top_k=top_k, mode="original", **inputs)
    g.node("PreviewImage", images=rank.out(1))
    return g.finalize()


def test_clip_rank_sorts_one_unbatched_image_as_a_batch_of_one(comfy):
    """An [H,W,C] image (the Sampler and Edit Metrics take one) is a batch of one: not sorted by its rows."""
    image = _rand(40, 48, 3)
    result = comfy.run(rank_graph(tensor(image), mask=mask_tensor(_box(1, 40, 48))))
    ranked, top, scores = (result.tensors["rank"][i][0] for i in range(3))
    assert torch.equal(ranked, image[None]) and torch.equal(top, image[None])
    assert scores.count("\n") == 0 and scores.startswith("1. image 0: ")


@pytest.mark.parametrize("top_k", [0, -1])
def test_clip_rank_refuses_a_linked_top_k_below_one(comfy, top_k):
    """The widget stops at 1, a link does not: 0 gave an empty IMAGE batch that broke the next node, -1 all images
    but the worst."""
    prompt = rank_graph(tensor(_rand(3, 24, 24, 3)))
    prompt["k"] = {"class_type": "PrimitiveInt", "inputs": {"value": top_k}}
    prompt["rank"]["inputs"]["top_k"] = ["k", 0]
    with pytest.raises(harness.PromptExecutionError, match=f"top_k must be at least 1, got {top_k}"):
        comfy.run(prompt)


@pytest.mark.parametrize("images, masks", list(itertools.product((1, 2), (3,))))
def test_clip_rank_says_which_multiple_a_mask_batch_needs(comfy, images, masks):
    with pytest.raises(harness.PromptExecutionError,
                       match=rf"mask has a batch of {masks} but there are {images} images: .*"
                             rf"\({images} must be a multiple of {masks}\)"):
        comfy.run(rank_graph(tensor(_rand(images, 24, 24, 3)), mask=mask_tensor(_box(masks, 24, 24))))


# ------------------------------------------------------------------------------------------------ Edit Metrics


def metrics_graph(results, image, mask):
    g = harness.graph_builder()
    g.node("BlendedDiffusion_EditMetrics", id="metrics", results=results(g), image=image(g), mask=mask(g),
           ring_width=2, lpips="off")
    return g.finalize()


def test_edit_metrics_names_the_image_input_that_is_wrong(comfy):
    """Two IMAGE inputs: an error about one says which."""
    nan = _rand(2, 24, 24, 3)
    nan[1, 3, 4, 0] = float("nan")
    with pytest.raises(harness.PromptExecutionError, match="the results input contains NaN or infinite values"):
        comfy.run(metrics_graph(tensor(nan), tensor(_rand(1, 24, 24, 3)), mask_tensor(_box(1, 24, 24))))
    with pytest.raises(harness.PromptExecutionError, match=r"the image input has 2 channels, expected 1 \(gray\)"):
        comfy.run(metrics_graph(tensor(_rand(2, 24, 24, 3)), tensor(_rand(1, 24, 24, 2)), mask_tensor(_box(1, 24, 24))))


def test_edit_metrics_scores_odd_tensors_as_their_float32_rgb_copies(comfy):
    """RGBA strided, unbatched float64, bf16 inputs and a 0..255 mask score as the plain tensors do."""
    reference = _rand(1, 32, 32, 3, seed=1)
    results = reference.expand(2, -1, -1, -1).clone()
    results[:, 8:24, 8:24] = _rand(2, 16, 16, 3, seed=2)
    plain = comfy.run(metrics_graph(tensor(results), tensor(reference), mask_tensor(_box(1, 32, 32)))).tensors
    rgba_view = torch.cat([results, torch.ones(2, 32, 32, 1)], -1).transpose(1, 2).contiguous().transpose(1, 2)
    odd = comfy.run(metrics_graph(tensor(rgba_view), tensor(reference[0].double()),
                                  mask_tensor(_box(1, 32, 32) * 255))).tensors
    assert plain["metrics"][2] == [float("inf")] * 2  # the background is the input's
    assert odd["metrics"][0] == plain["metrics"][0] and odd["metrics"][3] == plain["metrics"][3]
    half = comfy.run(metrics_graph(tensor(results.bfloat16()), tensor(reference.bfloat16()),
                                   mask_tensor(_box(1, 32, 32).bfloat16()))).tensors
    assert half["metrics"][2] == [float("inf")] * 2 and len(half["metrics"][3]) == 2


# ------------------------------------------------------------------------------------------------ the guidance nodes


def _linked(prompt, node, widget, value, kind="PrimitiveFloat"):
    """``prompt`` with ``node``'s ``widget`` fed by a primitive node: a link skips the widget's min and max."""
    key = f"linked_{node}_{widget}"
    prompt[key] = {"class_type": kind, "inputs": {"value": value}}
    prompt[node]["inputs"][widget] = [key, 0]
    return prompt


def _with_clip_list(prompt, **widgets):
    prompt["clips"] = {"class_type": "BlendedDiffusion_CLIPList",
                       "inputs": {"clip": ["clip", 0], "weight": 0.5, "num_views": 2, **widgets}}
    prompt["guidance"]["inputs"]["more_clips"] = ["clips", 0]
    return prompt


def _with_image_target(prompt):
    key = uuid.uuid4().hex
    _TENSORS[key] = _rand(1, 24, 24, 3)
    prompt["target"] = {"class_type": "BlendedTest_TensorImage", "inputs": {"key": key}}
    prompt["guidance"]["inputs"]["image_target"] = ["target", 0]
    return prompt


def _with_augmentations(prompt):
    prompt["augmentations"] = {"class_type": "BlendedDiffusion_Augmentations",
                               "inputs": {"num_views": 2, "degrees": 15.0, "translate": 0.1, "p_affine": 0.7,
                                          "distortion": 0.7, "p_perspective": 0.7, "fix_translate": False}}
    prompt["guidance"]["inputs"]["augmentations"] = ["augmentations", 0]
    return prompt


NAN = float("nan")
LINKED_GUIDANCE_CASES = {
    # a NaN weight made every result NaN: the Sampler ran the whole edit, then blamed "guidance too strong"
    "clip_lambda NaN": (lambda p: p, "guidance", "clip_lambda", NAN, "clip_lambda is NaN"),
    "range_lambda NaN": (lambda p: p, "guidance", "range_lambda", NAN, "range_lambda is NaN"),
    "background_l2_lambda NaN": (lambda p: p, "guidance", "background_l2_lambda", NAN, "background_l2_lambda is NaN"),
    "image_target_weight NaN": (_with_image_target, "guidance", "image_target_weight", NAN,
                                "image_target_weight is NaN"),
    "CLIP List weight NaN": (_with_clip_list, "clips", "weight", NAN, "CLIP List.s weight is NaN"),
    # a negative loss weight ran silently: range_lambda < 0 rewards pixels out of range, clip_lambda < 0 pushes away
    # from every prompt (the schedule refuses a negative multiplier for the same reason)
    "clip_lambda negative": (lambda p: p, "guidance", "clip_lambda", -1000.0,
                             r"clip_lambda must be >= 0, got -1000.0: .*give a prompt part a negative weight"),
    "range_lambda negative": (lambda p: p, "guidance", "range_lambda", -50.0, "range_lambda must be >= 0"),
    "CLIP List weight negative": (_with_clip_list, "clips", "weight", -1.0,
                                  r"CLIP List.s weight must be >= 0, got -1.0"),
}


@pytest.mark.parametrize("case", list(LINKED_GUIDANCE_CASES))
def test_a_linked_nan_or_negative_guidance_weight_is_refused_before_the_models_load(comfy, monkeypatch, case):
    add, node, widget, value, message = LINKED_GUIDANCE_CASES[case]
    bridge = comfy.pack_module("comfy_bridge")
    loads = []
    monkeypatch.setattr(bridge, "load_for_sampling", lambda *args, **kwargs: loads.append(args))
    prompt = _linked(add(graph(tensor(_rand(1, 32, 32, 3)), mask_tensor(_box(1, 32, 32)))), node, widget, value)
    with pytest.raises(harness.PromptExecutionError, match=message):
        comfy.run(prompt)
    assert loads == []


@pytest.mark.parametrize("add, node", [(lambda p: p, "guidance"), (_with_clip_list, "clips"),
                                       (_with_augmentations, "augmentations")])
def test_a_linked_huge_view_count_is_refused(comfy, add, node):
    """100000 views ran for minutes even on the tiny CLIP; 2**40 failed with a bare allocation error."""
    for views in (2**40, 100_000):
        prompt = _linked(add(graph(tensor(_rand(1, 32, 32, 3)), mask_tensor(_box(1, 32, 32)))), node, "num_views",
                         views, "PrimitiveInt")
        with pytest.raises(harness.PromptExecutionError, match=f"num_views must be at most 1024, got {views}"):
            comfy.run(prompt)


def _images(comfy, text, **widgets):
    return comfy.run(graph(tensor(_rand(1, 32, 32, 3)), mask_tensor(_box(1, 32, 32)), prompt=text,
                           **widgets)).tensors["sampler"][0][0]


def test_a_prompt_ending_in_a_ratio_or_a_time_is_refused_as_ambiguous(comfy):
    """'a photo 16:9' was the text 'a photo 16' with the weight 9, silently; the error says both ways to write it."""
    with pytest.raises(harness.PromptExecutionError) as err:
        comfy.run(graph(tensor(_rand(1, 32, 32, 3)), mask_tensor(_box(1, 32, 32)), prompt="a red rock | photo 16:9"))
    message = str(err.value)
    assert "'photo 16:9' is ambiguous: it ends in a number, a colon and a whole number, which reads as the weight 9 " \
           "of 'photo 16'" in message
    assert r"escape its colons: 'photo 16\:9'" in message
    assert "put a space before the colon: 'photo 16 :9'" in message
    escaped = _images(comfy, r"a red rock | photo 16\:9")
    torch.testing.assert_close(_images(comfy, "a red rock | photo 16:9 :1"), escaped, atol=0, rtol=0)
    assert not torch.equal(_images(comfy, "a red rock | photo 16 :9"), escaped)  # the weight 9, asked for
    assert _images(comfy, "a red rock, 16:9 photo").shape == (1, 32, 32, 3)  # a colon inside stays text


@pytest.mark.parametrize("text, message", [
    ("a red rock:nan", "'nan' is not a number"), ("a red rock:inf", "'inf' is not a number"),
    ("a red rock:,5", "',5' is not a number.* with a decimal point, not a comma")])
def test_a_weight_of_nan_inf_or_with_a_decimal_comma_is_refused(comfy, text, message):
    """These were the text 'a red rock:nan' of weight 1 (while ':-inf' and ':0,5' were refused)."""
    with pytest.raises(harness.PromptExecutionError, match=f"malformed weight in the prompt part '{text}': {message}"):
        _images(comfy, text)


@pytest.mark.parametrize("text", ["\ufeff\na red rock", "a red rock\n\u200b\n", "a red rock\r\n\x00\r\n"])
def test_a_line_of_only_invisible_characters_is_no_prompt(comfy, text):
    """A byte-order mark, a zero-width space or a control character alone on a line (text pasted from a file) made
    a set of results of its own, guided toward the empty text."""
    torch.testing.assert_close(_images(comfy, text), _images(comfy, "a red rock"), atol=0, rtol=0)


@pytest.mark.parametrize("shape, values", [("values", "0,5"), ("linear", "0,5 1,5"), ("values", "1,5; 0.5")])
def test_schedule_values_with_decimal_commas_are_refused_when_queued(comfy, shape, values):
    """'0,5' was the values 0 and 5 and '0,5 1,5' four values, silently. (A linear schedule's '1,0' can only be
    two values: tests/test_prompts_schedule.py.)"""
    prompt = graph(tensor(_rand(1, 32, 32, 3)), mask_tensor(_box(1, 32, 32)))
    prompt["schedule"] = {"class_type": "BlendedDiffusion_GuidanceSchedule",
                          "inputs": {"shape": shape, "values": values, "gradient_guard": "off", "limit": 0.05}}
    prompt["guidance"]["inputs"]["schedule"] = ["schedule", 0]
    with pytest.raises(harness.PromptExecutionError, match="prompt rejected") as err:
        comfy.run(prompt)
    assert f"schedule values {values!r} look like they use decimal commas" in str(err.value)

"""Weighted prompts, image targets, CLIP List and Guidance Schedule through ComfyUI's executor: the nodes only
parse and pass (the same images as the library given the same inputs), and bad text gets a clear error."""

from __future__ import annotations

import pytest
import torch
from test_node_errors import box_mask, empty_image, graph, solid_mask

import harness

pytestmark = pytest.mark.comfy

PROMPT = "a red rock:1.0 | moss:0.5 | blurry:-0.5\na blue sky"


# Guidance weights other than the defaults (1000 / 50 / 0), so that a widget the node dropped changes the images.
LAMBDAS = {"clip_lambda": 3000.0, "range_lambda": 20.0, "background_l2_lambda": 500.0}


def options_graph(prompt=PROMPT, values="1.5, 0.2", mask=None, **guidance):
    """``mask``: a mask node (default: all 1); ``guidance``: more CLIP Guidance widget values."""
    nodes = graph(empty_image(64, 64, color=0x808080), mask or solid_mask(1.0), prompt=prompt)
    nodes["guidance"]["inputs"].update(image_target=["20", 0], image_target_mask=["23", 0], image_target_weight=0.7,
                                more_clips=["24", 0], schedule=["25", 0], **guidance)
    nodes["20"] = {"class_type": "EmptyImage", "inputs": {"width": 48, "height": 40, "batch_size": 1,
                                                        "color": 0xCC4422}}
    nodes["21"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 48, "height": 40}}
    nodes["22"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 20, "height": 16}}
    nodes["23"] = {"class_type": "MaskComposite", "inputs": {"destination": ["21", 0], "source": ["22", 0],
                                                             "x": 10, "y": 8, "operation": "add"}}
    nodes["24"] = {"class_type": "BlendedDiffusion_CLIPList", "inputs": {"clip": ["clip", 0], "weight": 0.5,
                                                                         "num_views": 2}}
    nodes["25"] = {"class_type": "BlendedDiffusion_GuidanceSchedule",
                   "inputs": {"shape": "linear", "values": values, "gradient_guard": "normalize", "limit": 0.5}}
    return nodes


def test_the_options_through_the_nodes_equal_the_library(comfy_inprocess):
    """With a background for background_l2_lambda to keep (the box mask) and non-default weights."""
    from blended.augment import AugmentationSettings
    from blended.checkpoint import load_guided_diffusion
    from blended.clip_model import load_guidance_clip
    from blended.diffusion import create_diffusion
    from blended.guidance import GuidanceSettings
    from blended.prompts import parse_prompt_lines
    from blended.sampler import SamplerSettings, edit_image
    from blended.schedule import GuidanceSchedule
    from blended.targets import GuidanceClip, ImageTarget

    result = comfy_inprocess.run(options_graph(mask=box_mask(), **LAMBDAS))
    images = result.tensors["sampler"][0][0]
    assert images.shape == (2, 64, 64, 3)

    unet = load_guided_diffusion(path=harness.TINY_MODELS[0][2])[0]
    clip = load_guidance_clip(path=harness.TINY_MODELS[1][2])
    reference = torch.tensor([0xCC, 0x44, 0x22]).div(255.0).view(1, 3, 1, 1).expand(1, 3, 40, 48)
    region = torch.zeros(1, 1, 40, 48)
    region[..., 8:24, 10:30] = 1
    box = torch.zeros(1, 64, 64)
    box[:, 16:48, 16:48] = 1
    expected = edit_image(
        torch.full((1, 64, 64, 3), 0x80 / 255.0), box, unet, create_diffusion(timestep_respacing="4"),
        clip, parse_prompt_lines(PROMPT), seed=1, num_results=1,
        settings=SamplerSettings(skip_timesteps=1, batch_size=1),
        guidance_settings=GuidanceSettings(**LAMBDAS, augmentations=AugmentationSettings(num_views=1),
                                           schedule=GuidanceSchedule("linear", (1.5, 0.2), "normalize", 0.5)),
        extra_clips=[GuidanceClip(clip, 0.5, 2)], image_targets=[ImageTarget(reference, region, 0.7)])
    # float32 rounding of the core image/mask nodes only: far below one 8-bit grey level (4e-3)
    torch.testing.assert_close(images, expected.images, atol=1e-4, rtol=0)
    # and the options did change the edit: the plain first line alone gives other images
    plain = comfy_inprocess.run(graph(empty_image(64, 64, color=0x808080), box_mask(), prompt="a red rock"))
    assert not torch.allclose(plain.tensors["sampler"][0][0][0], images[0], atol=1e-3)


def test_a_malformed_weight_is_refused_quoting_the_part(comfy_inprocess):
    with pytest.raises(harness.PromptExecutionError) as err:
        comfy_inprocess.run(options_graph(prompt="a red rock:1.0 | moss:0.5x"))
    assert "'moss:0.5x'" in str(err.value) and "malformed weight" in str(err.value)


def test_a_bad_schedule_value_is_refused_quoting_it(comfy_inprocess):
    with pytest.raises(harness.PromptExecutionError) as err:
        comfy_inprocess.run(options_graph(values="1.0, lots"))
    assert "'lots'" in str(err.value)


@pytest.mark.parametrize("values, quoted", [("1.0", "exactly two values"), ("0,5; 1,5", "decimal commas"),
                                            ("-1, 2", "is negative")])
def test_a_bad_schedule_is_refused_when_queued_before_any_loader_runs(comfy_inprocess, values, quoted):
    seen = len(comfy_inprocess.server.messages)
    with pytest.raises(harness.PromptExecutionError, match="prompt rejected") as err:
        comfy_inprocess.run(options_graph(values=values))
    assert quoted in str(err.value)
    assert not [m for m in comfy_inprocess.server.messages[seen:] if m[0] == "executing"]


def test_each_part_has_its_own_token_limit(comfy_inprocess):
    long_part = " ".join(["rock"] * 60)  # 62 tokens alone, more than 77 with the other part
    prompt = graph(empty_image(), solid_mask(1.0), prompt=f"{long_part} | {long_part}:0.5")
    prompt["guidance"]["inputs"]["truncate_long_prompts"] = False
    assert comfy_inprocess.run(prompt).tensors["sampler"][0][0].shape == (1, 64, 64, 3)
    prompt = graph(empty_image(), solid_mask(1.0), prompt=f"{long_part} {long_part} | moss")
    prompt["guidance"]["inputs"]["truncate_long_prompts"] = False
    with pytest.raises(harness.PromptExecutionError, match="limit is 77"):
        comfy_inprocess.run(prompt)


def test_image_target_masks_each_count_and_an_empty_one_is_refused(comfy_inprocess):
    """One reference picture with several masks is a target per mask, as one image with several masks is edited
    in several places (none silently dropped); a mask with nothing in it for one of several pictures is refused,
    naming it, where it used to make that target a plain grey picture."""
    from blended import targets

    mappings = comfy_inprocess.node_class_mappings
    clip = mappings["BlendedDiffusion_LoadCLIP"]().load(harness.CLIP_TINY_NAME, "float32")[0]
    guidance = mappings["BlendedDiffusion_CLIPGuidance"]()
    picture = torch.rand(1, 40, 48, 3, generator=torch.Generator().manual_seed(4))
    masks = torch.zeros(3, 40, 48)
    masks[0, :10], masks[1, 20:], masks[2, :, 30:] = 1, 1, 1

    def embeddings(image_target, image_target_mask):
        spec = guidance.build(clip, "", 1000.0, 50.0, 1, image_target=image_target,
                              image_target_mask=image_target_mask)[0]
        target = spec.image_targets[0]
        return targets.image_target_embeddings(clip.clip, [targets.ImageTarget(target.image, target.mask, 1.0)],
                                               "cpu")[0]

    embeds, weight = embeddings(picture, masks)
    assert embeds.shape[0] == 3 and weight == pytest.approx(1 / 3)
    for i in range(3):
        torch.testing.assert_close(embeds[i:i + 1], embeddings(picture, masks[i:i + 1])[0], atol=1e-6, rtol=0)
    partly_empty = masks[:2].clone()
    partly_empty[1] = 0
    # refused by CLIP Guidance itself, before the Sampler loads its models, naming the input
    with pytest.raises(ValueError, match=r"image_target_mask is empty \(all 0\) for picture\(s\) \[1\]"):
        embeddings(picture.expand(2, -1, -1, -1), partly_empty)
    # and by the library, for callers without the node
    with pytest.raises(ValueError, match=r"image target's mask is empty \(for picture\(s\) \[1\] of 2\)"):
        targets.image_target_embeddings(clip.clip, [targets.ImageTarget(picture.expand(2, -1, -1, -1).movedim(-1, 1),
                                                                         partly_empty[:, None], 1.0)], "cpu")

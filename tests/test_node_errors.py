"""Bad inputs through ComfyUI's own executor: each gets a clear error or a documented behaviour, and the
executor keeps working afterwards (nothing is corrupted)."""

from __future__ import annotations

import pytest
import torch

import comfy_harness as harness

pytestmark = pytest.mark.comfy


def graph(image_node, mask_node, prompt="a red rock", respacing="4", skip=1, **sampler):
    """An API prompt: tiny models -> guidance -> sampler(image, mask) -> PreviewImage."""
    nodes = {
        "1": {"class_type": "BlendedDiffusion_LoadGuidedDiffusion",
              "inputs": {"model_name": harness.GD_TINY_NAME, "dtype": "float32", "attention_order": "auto",
                         "head_channels": 0, "gradient_checkpointing": False}},
        "2": {"class_type": "BlendedDiffusion_LoadCLIP", "inputs": {"clip_name": harness.CLIP_TINY_NAME,
                                                                     "dtype": "float32"}},
        "3": {"class_type": "BlendedDiffusion_CLIPGuidance",
              "inputs": {"clip": ["2", 0], "prompt": prompt, "clip_lambda": 1000.0, "range_lambda": 50.0,
                         "num_views": 1, "truncate_long_prompts": True}},
        "10": image_node,
        "11": mask_node,
        "4": {"class_type": "BlendedDiffusion_Sampler",
              "inputs": {"model": ["1", 0], "guidance": ["3", 0], "image": ["10", 0], "mask": ["11", 0],
                         "seed": 1, "num_results": 1, "respacing": respacing, "skip_timesteps": skip,
                         "method": "ddpm", "mode": "blended", "enforce_background": True, "invert_mask": False,
                         "batch_size": 1, **sampler}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }
    return nodes


def empty_image(width=64, height=64, batch=1, color=0x808080):
    return {"class_type": "EmptyImage", "inputs": {"width": width, "height": height, "batch_size": batch,
                                                   "color": color}}


def solid_mask(value=1.0, width=64, height=64):
    return {"class_type": "SolidMask", "inputs": {"value": value, "width": width, "height": height}}


def images_of(result, node="4"):
    return result.tensors[node][0]


def test_empty_mask_is_refused_with_what_to_do(comfy_inprocess):
    with pytest.raises(harness.PromptExecutionError) as err:
        comfy_inprocess.run(graph(empty_image(), solid_mask(0.0)))
    message = str(err.value)
    assert "mask is empty" in message and "invert_mask" in message


def test_executor_still_works_after_an_error(comfy_inprocess):
    with pytest.raises(harness.PromptExecutionError):
        comfy_inprocess.run(graph(empty_image(), solid_mask(0.0)))
    result = comfy_inprocess.run(graph(empty_image(), solid_mask(1.0)))
    assert images_of(result)[0].shape == (1, 64, 64, 3)


def test_mask_of_another_size_is_resized(comfy_inprocess):
    result = comfy_inprocess.run(graph(empty_image(96, 80), solid_mask(1.0, 32, 32)))
    images, mask = result.tensors["4"][0][0], result.tensors["4"][1][0]
    assert images.shape == (1, 80, 96, 3)
    assert mask.shape == (1, 80, 96)


def test_one_pixel_image_works(comfy_inprocess):
    result = comfy_inprocess.run(graph(empty_image(1, 1), solid_mask(1.0, 1, 1)))
    assert images_of(result)[0].shape == (1, 1, 1, 3)


def test_rgba_image_loses_alpha_and_keeps_background(comfy_inprocess):
    rgba = {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["12", 0], "alpha": ["13", 0]}}
    prompt = graph(rgba, solid_mask(0.0))
    prompt["12"] = empty_image(64, 64, color=0x336699)
    prompt["13"] = solid_mask(1.0)
    # mask: a box in the middle
    prompt["11"] = {"class_type": "MaskComposite",
                    "inputs": {"destination": ["14", 0], "source": ["15", 0], "x": 16, "y": 16, "operation": "add"}}
    prompt["14"] = solid_mask(0.0)
    prompt["15"] = solid_mask(1.0, 32, 32)
    result = comfy_inprocess.run(prompt)
    out = images_of(result)[0]
    assert out.shape == (1, 64, 64, 3)
    expected = torch.tensor([0x33, 0x66, 0x99]) / 255.0
    torch.testing.assert_close(out[0, 0, 0], expected, atol=1e-6, rtol=0)


def test_image_and_mask_batches_follow_core_rules(comfy_inprocess):
    # 2 images, 1 mask: the mask is repeated; 2 results x 2 images = 4 outputs
    result = comfy_inprocess.run(graph(empty_image(batch=2), solid_mask(1.0), num_results=2))
    assert images_of(result)[0].shape == (4, 64, 64, 3)


def test_skip_steps_not_below_steps_is_refused(comfy_inprocess):
    with pytest.raises(harness.PromptExecutionError) as err:
        comfy_inprocess.run(graph(empty_image(), solid_mask(1.0), respacing="4", skip=4))
    assert "skip" in str(err.value)


def test_bad_respacing_is_refused(comfy_inprocess):
    with pytest.raises(harness.PromptExecutionError) as err:
        comfy_inprocess.run(graph(empty_image(), solid_mask(1.0), respacing="lots"))
    assert "respacing" in str(err.value)


def test_too_long_prompt_is_truncated_or_refused(comfy_inprocess):
    long_prompt = " ".join(["rock"] * 100)
    result = comfy_inprocess.run(graph(empty_image(), solid_mask(1.0), prompt=long_prompt))
    assert images_of(result)[0].shape == (1, 64, 64, 3)
    prompt = graph(empty_image(), solid_mask(1.0), prompt=long_prompt)
    prompt["3"]["inputs"]["truncate_long_prompts"] = False
    with pytest.raises(harness.PromptExecutionError) as err:
        comfy_inprocess.run(prompt)
    assert "77" in str(err.value)


def test_wrong_model_file_kinds_are_refused(comfy_inprocess, comfy_models_dir):
    # the CLIP file in the diffusion folder and the diffusion file in the CLIP folder
    import shutil

    shutil.copyfile(comfy_models_dir / "clip_guidance" / harness.CLIP_TINY_NAME,
                    comfy_models_dir / "guided_diffusion" / "not_a_unet.safetensors")
    shutil.copyfile(comfy_models_dir / "guided_diffusion" / harness.GD_TINY_NAME,
                    comfy_models_dir / "clip_guidance" / "not_a_clip.safetensors")
    (comfy_models_dir / "guided_diffusion" / "broken.pt").write_bytes(b"PK\x03\x04 truncated")
    for folder_node, field, name in (("1", "model_name", "not_a_unet.safetensors"),
                                     ("2", "clip_name", "not_a_clip.safetensors"),
                                     ("1", "model_name", "broken.pt")):
        prompt = graph(empty_image(), solid_mask(1.0))
        prompt[folder_node]["inputs"][field] = name
        with pytest.raises(harness.PromptExecutionError) as err:
            comfy_inprocess.run(prompt)
        assert name in str(err.value)


def test_nan_image_is_refused():
    """No core node makes NaN pixels on purpose (broken custom math nodes do): check the sampler's own gate."""
    from blended.errors import BlendedInputError
    from blended.image_io import to_rgb_nchw

    image = torch.zeros(1, 8, 8, 3)
    image[0, 1, 1, 0] = float("nan")
    with pytest.raises(BlendedInputError, match="NaN"):
        to_rgb_nchw(image)


def test_lpips_without_its_files_is_refused_clearly(comfy_inprocess):
    prompt = graph(empty_image(), solid_mask(1.0))
    prompt["3"]["inputs"]["background_lpips_lambda"] = 1000.0
    with pytest.raises(harness.PromptExecutionError) as err:
        comfy_inprocess.run(prompt)
    assert "LPIPS" in str(err.value) and ("lpips" in str(err.value) or "VGG16" in str(err.value))

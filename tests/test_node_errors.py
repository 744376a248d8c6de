"""Bad inputs through ComfyUI's own executor: each gets a clear error or a documented behaviour, and the
executor keeps working afterwards (nothing is corrupted)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import os
import weakref

import pytest
import torch

import harness

pytestmark = pytest.mark.comfy

SPEED_DEFAULTS = {"precision": "auto", "reuse_guided_forward": False, "channels_last": False,
                  "gradient_checkpointing": False, "compile": False}


def graph(image, mask, prompt="a red rock", respacing="4", skip=1, speed=None, **sampler):
    """An API prompt: tiny models -> guidance -> sampler(image, mask) -> PreviewImage.

    `image` and `mask` add their own nodes to the builder and return the output to feed the sampler. `speed`:
    widget values of a Speed node to connect (None = no Speed node). Node ids are names: "unet", "clip",
    "guidance", "sampler", "preview" (and "speed").
    """
    g = harness.graph_builder()
    unet = g.node("BlendedDiffusion_LoadGuidedDiffusion", id="unet", model_name=harness.GD_TINY_NAME,
                  attention_order="auto", head_channels=0)
    clip = g.node("BlendedDiffusion_LoadCLIP", id="clip", clip_name=harness.CLIP_TINY_NAME, dtype="float32")
    guidance = g.node("BlendedDiffusion_CLIPGuidance", id="guidance", clip=clip.out(0), prompt=prompt,
                      clip_lambda=1000.0, range_lambda=50.0, num_views=1, truncate_long_prompts=True)
    widgets = {"seed": 1, "num_results": 1, "respacing": respacing, "skip_timesteps": skip, "method": "ddpm",
               "mode": "blended", "enforce_background": True, "invert_mask": False, "batch_size": 1, **sampler}
    if speed is not None:
        widgets["speed"] = g.node("BlendedDiffusion_Speed", id="speed", **{**SPEED_DEFAULTS, **speed}).out(0)
    edit = g.node("BlendedDiffusion_Sampler", id="sampler", model=unet.out(0), guidance=guidance.out(0),
                  image=image(g), mask=mask(g), **widgets)
    g.node("PreviewImage", id="preview", images=edit.out(0))
    return g.finalize()


def empty_image(width=64, height=64, batch=1, color=0x808080):
    return lambda g: g.node("EmptyImage", width=width, height=height, batch_size=batch, color=color).out(0)


def solid_mask(value=1.0, width=64, height=64):
    return lambda g: g.node("SolidMask", value=value, width=width, height=height).out(0)


def box_mask():
    """A 64x64 mask, 1 on the 32x32 box in the middle."""
    return lambda g: g.node("MaskComposite", destination=solid_mask(0.0)(g), source=solid_mask(1.0, 32, 32)(g),
                            x=16, y=16, operation="add").out(0)


def images_of(result, node="sampler"):
    return result.tensors[node][0]


def test_empty_mask_is_refused_with_what_to_do(comfy_inprocess):
    with pytest.raises(harness.PromptExecutionError) as err:
        comfy_inprocess.run(graph(empty_image(), solid_mask(0.0)))
    message = str(err.value)
    assert "mask is empty" in message and "invert_mask" in message


@pytest.mark.parametrize("case", ["skip", "empty", "empty inverted", "eta", "views"])
def test_what_the_widgets_and_mask_refuse_is_refused_before_the_models_load(comfy_inprocess, monkeypatch, case):
    """A 2.2 GB model is not moved to the GPU and copied for a run its settings already rule out."""
    bridge = comfy_inprocess.pack_module("comfy_bridge")
    loads = []
    monkeypatch.setattr(bridge, "load_for_sampling", lambda *args, **kwargs: loads.append(args))
    prompt = {"skip": lambda: graph(empty_image(), solid_mask(1.0), respacing="4", skip=4),
              "empty": lambda: graph(empty_image(), solid_mask(0.0)),
              "empty inverted": lambda: graph(empty_image(), solid_mask(1.0), invert_mask=True),
              "eta": lambda: graph(empty_image(), solid_mask(1.0), method="ddim"),
              "views": lambda: graph(empty_image(), solid_mask(1.0))}[case]()
    if case == "eta":  # linked: the widget's own range is not checked for a link
        prompt["eta"] = {"class_type": "PrimitiveFloat", "inputs": {"value": 1.5}}
        prompt["sampler"]["inputs"]["ddim_eta"] = ["eta", 0]
    if case == "views":
        prompt["views"] = {"class_type": "PrimitiveInt", "inputs": {"value": 0}}
        prompt["guidance"]["inputs"]["num_views"] = ["views", 0]
    with pytest.raises(harness.PromptExecutionError,
                       match="skip_timesteps|mask is empty|ddim_eta must be|num_views must be"):
        comfy_inprocess.run(prompt)
    assert loads == []


def test_executor_still_works_after_an_error(comfy_inprocess):
    with pytest.raises(harness.PromptExecutionError):
        comfy_inprocess.run(graph(empty_image(), solid_mask(0.0)))
    result = comfy_inprocess.run(graph(empty_image(), solid_mask(1.0)))
    assert images_of(result)[0].shape == (1, 64, 64, 3)


def test_mask_of_another_size_is_resized(comfy_inprocess):
    result = comfy_inprocess.run(graph(empty_image(96, 80), solid_mask(1.0, 32, 32)))
    images, mask = result.tensors["sampler"][0][0], result.tensors["sampler"][1][0]
    assert images.shape == (1, 80, 96, 3)
    assert mask.shape == (1, 80, 96)


def test_one_pixel_image_works(comfy_inprocess):
    result = comfy_inprocess.run(graph(empty_image(1, 1), solid_mask(1.0, 1, 1)))
    assert images_of(result)[0].shape == (1, 1, 1, 3)


def test_rgba_image_loses_alpha_and_keeps_background(comfy_inprocess):
    def rgba(g):
        return g.node("JoinImageWithAlpha", image=empty_image(64, 64, color=0x336699)(g),
                      alpha=solid_mask(1.0)(g)).out(0)

    prompt = graph(rgba, box_mask())
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
    prompt["guidance"]["inputs"]["truncate_long_prompts"] = False
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
    for folder_node, field, name in (("unet", "model_name", "not_a_unet.safetensors"),
                                     ("clip", "clip_name", "not_a_clip.safetensors"),
                                     ("unet", "model_name", "broken.pt")):
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
    prompt["guidance"]["inputs"]["background_lpips_lambda"] = 1000.0
    with pytest.raises(harness.PromptExecutionError) as err:
        comfy_inprocess.run(prompt)
    assert "LPIPS" in str(err.value) and ("lpips" in str(err.value) or "VGG16" in str(err.value))


def test_only_real_out_of_memory_errors_get_the_advice(comfy_inprocess):
    bridge = comfy_inprocess.pack_module("comfy_bridge")
    assert bridge.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not bridge.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not bridge.is_out_of_memory(ValueError("the mask is empty"))


def test_out_of_memory_at_an_auto_batch_size_runs_again_at_a_smaller_one(comfy_inprocess, monkeypatch, caplog):
    """batch_size 0 (auto) promises a batch that fits; where the estimate was short, an out-of-memory error
    starts the edit again at about half the batch, down to 1, and gives the images a batch of 1 gives. A batch
    size set by hand, or a batch of 1 that still does not fit, raises the error with the advice."""
    sampler = comfy_inprocess.pack_module("sampler")
    real_edit_image = sampler.edit_image
    batches = []

    failed_attempts_tensors = []  # what each failed attempt allocated: freed before the next attempt starts

    def edit_image_out_of_memory_above_one(*args, settings, **kwargs):
        assert all(tensor() is None for tensor in failed_attempts_tensors)
        batches.append(settings.batch_size)
        if settings.batch_size > 1:
            activations = torch.empty(1 << 20)  # held by this frame, and so by the error's traceback
            failed_attempts_tensors.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real_edit_image(*args, settings=settings, **kwargs)

    monkeypatch.setattr(sampler, "_auto_batch_size", lambda *args: 5)
    monkeypatch.setattr(sampler, "edit_image", edit_image_out_of_memory_above_one)
    with caplog.at_level(logging.WARNING):
        auto = comfy_inprocess.run(graph(empty_image(), box_mask(), num_results=5, batch_size=0, seed=7))
    assert batches == [5, 2, 1] and len(failed_attempts_tensors) == 2
    assert "out of memory at batch_size=5 (auto); running again at 2" in caplog.text
    monkeypatch.setattr(sampler, "edit_image", real_edit_image)
    by_hand = comfy_inprocess.run(graph(empty_image(), box_mask(), num_results=5, batch_size=1, seed=7))
    torch.testing.assert_close(images_of(auto), images_of(by_hand), atol=0, rtol=0)
    monkeypatch.setattr(sampler, "edit_image", edit_image_out_of_memory_above_one)
    batches.clear()
    with pytest.raises(harness.PromptExecutionError) as err, caplog.at_level(logging.ERROR):
        comfy_inprocess.run(graph(empty_image(), box_mask(), num_results=5, batch_size=2, seed=7))
    assert batches == [2] and "out of memory" in str(err.value)
    # In the error dialog too, and still an out-of-memory error to ComfyUI (which adds its tips, frees its models).
    assert "ran out of memory with batch_size=2: lower batch_size" in err.value.details[0]["exception_message"]
    assert err.value.details[0]["exception_type"] == "torch.OutOfMemoryError"
    assert "This error means you ran out of memory on your GPU" in err.value.details[0]["exception_message"]
    assert "ran out of memory with batch_size=2: lower batch_size" in caplog.text


def test_speed_options_that_cannot_run_are_refused_with_what_to_do(comfy_inprocess, monkeypatch):
    """cuda_graphs with compile (one replays the eager kernels the other replaces) is refused at the Speed node;
    triton_kernels on a CUDA device whose Python has no triton package says what to install."""
    with pytest.raises(harness.PromptExecutionError) as err:
        comfy_inprocess.run(graph(empty_image(), solid_mask(1.0), speed={"compile": True, "cuda_graphs": True}))
    assert "cuda_graphs and compile cannot be combined" in str(err.value)
    speed = comfy_inprocess.pack_module("speed")
    monkeypatch.setattr(speed.bridge.mm, "get_torch_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(speed.bridge.mm, "should_use_fp16", lambda *args, **kwargs: True)
    find_spec = importlib.util.find_spec  # a Python without the triton package
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else
                        find_spec(name, *a))
    with pytest.raises(ValueError, match=r"triton_kernels needs the 'triton' Python package.*pip install triton"):
        speed.speed_options(triton_kernels=True)
    assert speed.speed_options(cuda_graphs=True).cuda_graphs  # graphs need no package beyond torch
    assert speed.speed_options(cudnn_benchmark=True).cudnn_benchmark and not speed.speed_options().cudnn_benchmark
    monkeypatch.undo()
    assert images_of(comfy_inprocess.run(graph(empty_image(), solid_mask(1.0))))[0].shape == (1, 64, 64, 3)


def test_a_triton_failure_with_triton_kernels_on_says_which_option_to_turn_off(comfy_inprocess, monkeypatch,
                                                                               caplog):
    """A GPU that Triton cannot compile the pack's kernels for fails inside the triton package: with
    triton_kernels on at a Speed node, the Sampler's error names the option to turn off (the original error is its
    cause). Without a Speed node the kernels were the pack's own choice: the run starts again without them and
    succeeds, and later runs on that device leave them out. With them off, an error from elsewhere passes through
    as it was."""
    sampler = comfy_inprocess.pack_module("sampler")
    speed = comfy_inprocess.pack_module("speed")
    devices = sampler.raised_in_triton.__globals__
    source = "def compile_kernel():\n    raise RuntimeError('ptxas fatal: Value sm_61 is not defined')\n"
    namespace = {}
    # code that says it lives in the installed triton package, as its compiler's does, called from a launch in one of
    # the pack's kernel modules
    exec(compile(source, os.path.join(devices["triton_package_dir"](), "compiler", "compiler.py"), "exec"), namespace)
    launch = "def launch_kernel():\n    compile_kernel()\n"
    exec(compile(launch, os.path.join(devices["_PACK_DIR"], "triton_norm.py"), "exec"), namespace)
    run_options = []  # the options of each run, as the Sampler applies them to its clones
    real_run_clones, real_edit_image = sampler.fast_paths.run_clones, sampler.edit_image

    def recording_run_clones(unet, clip, options, *args, **kwargs):
        run_options.append(options)
        return real_run_clones(unet, clip, options, *args, **kwargs)

    def edit_image_failing_in_triton(*args, **kwargs):
        if run_options[-1].triton_norm or run_options[-1].triton_clip:
            namespace["launch_kernel"]()
        return real_edit_image(*args, **kwargs)

    monkeypatch.setattr(sampler.fast_paths, "run_clones", recording_run_clones)
    monkeypatch.setattr(sampler, "edit_image", edit_image_failing_in_triton)
    monkeypatch.setattr(speed, "_TRITON_FAILED_ON", {})
    with pytest.raises(harness.PromptExecutionError) as err:
        comfy_inprocess.run(graph(empty_image(), solid_mask(1.0), speed={"triton_kernels": True}))
    message = str(err.value)
    assert "Triton kernels failed on this GPU (RuntimeError: ptxas fatal" in message
    assert "Turn triton_kernels off on the Speed node" in message
    assert len(run_options) == 1 and speed._TRITON_FAILED_ON == {}  # asked for: not retried, not remembered
    # The card out of memory while Triton loads a kernel is an out-of-memory error, not a kernel that cannot run
    # there: at an auto batch the edit runs again smaller, with the kernels still on.
    loading = "def load_kernel():\n    raise RuntimeError('Triton Error [CUDA]: out of memory')\n"
    exec(compile(loading, os.path.join(devices["triton_package_dir"](), "backends", "driver.py"), "exec"), namespace)
    launch_loading = "def launch_loaded_kernel():\n    load_kernel()\n"
    exec(compile(launch_loading, os.path.join(devices["_PACK_DIR"], "triton_norm.py"), "exec"), namespace)

    def edit_image_out_of_memory_in_triton_above_one(*args, settings, **kwargs):
        if settings.batch_size > 1:
            namespace["launch_loaded_kernel"]()
        return real_edit_image(*args, settings=settings, **kwargs)

    monkeypatch.setattr(sampler, "edit_image", edit_image_out_of_memory_in_triton_above_one)
    monkeypatch.setattr(sampler, "_auto_batch_size", lambda *args: 2)
    monkeypatch.setattr(sampler, "default_speed_options", lambda: sampler.fast_paths.FASTEST_GPU)
    run_options.clear()
    comfy_inprocess.run(graph(empty_image(), solid_mask(1.0), seed=5, num_results=2, batch_size=0))
    assert [(o.triton_norm, o.triton_clip) for o in run_options] == [(True, True)] * 2  # batch 2, then 1
    assert speed._TRITON_FAILED_ON == {}
    monkeypatch.setattr(sampler, "edit_image", edit_image_failing_in_triton)
    # Without a Speed node a CUDA GPU runs the Triton kernels by default: the run falls back to PyTorch's kernels.
    monkeypatch.setattr(sampler, "default_speed_options", lambda: sampler.fast_paths.FASTEST_GPU)
    run_options.clear()
    with caplog.at_level(logging.WARNING):
        fell_back = comfy_inprocess.run(graph(empty_image(), solid_mask(1.0), seed=3))
    assert images_of(fell_back)[0].shape == (1, 64, 64, 3)
    assert [(o.triton_norm, o.triton_clip) for o in run_options] == [(True, True), (False, False)]
    assert dataclasses.replace(run_options[1], clip_precision=None) == sampler.fast_paths.FASTEST_GPU_WITHOUT_TRITON
    assert "running again with PyTorch's own kernels" in caplog.text and "ptxas fatal" in caplog.text
    assert list(speed._TRITON_FAILED_ON.values()) == ["ptxas fatal: Value sm_61 is not defined"]
    # Remembered for the device: the real default now leaves the kernels out there (a CUDA GPU with bf16).
    monkeypatch.setattr(speed.bridge.mm, "get_torch_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(speed.bridge.mm, "should_use_bf16", lambda *args, **kwargs: True)
    monkeypatch.setattr(speed, "_TRITON_FAILED_ON", {"cuda:0": "ptxas fatal"})
    assert speed.default_speed_options() == sampler.fast_paths.FASTEST_GPU_WITHOUT_TRITON
    monkeypatch.setattr(speed, "_TRITON_FAILED_ON", {"cuda:1": "ptxas fatal"})
    assert speed.default_speed_options() == sampler.fast_paths.FASTEST_GPU
    monkeypatch.undo()
    # An error from outside Triton, or from Triton with the kernels off, passes through as it was; so does one from
    # Triton that no launch of the pack's kernels led to (torch.compile's own Triton code, with the kernels on).
    monkeypatch.setattr(sampler, "edit_image", lambda *a, **k: namespace["launch_kernel"]())
    with pytest.raises(harness.PromptExecutionError) as err:
        comfy_inprocess.run(graph(empty_image(), solid_mask(1.0), seed=2, speed={}))
    assert "ptxas fatal" in str(err.value) and "triton_kernels" not in str(err.value)
    monkeypatch.setattr(sampler, "edit_image", lambda *a, **k: namespace["compile_kernel"]())
    with pytest.raises(harness.PromptExecutionError) as err:
        comfy_inprocess.run(graph(empty_image(), solid_mask(1.0), seed=2, speed={"triton_kernels": True}))
    assert "ptxas fatal" in str(err.value) and "triton_kernels" not in str(err.value)
    # the same error from code outside the package (a ComfyUI under a folder named triton, say) is not Triton's
    elsewhere = {}
    exec(compile(source, os.path.join(os.sep, "home", "triton", "ComfyUI", "nodes.py"), "exec"), elsewhere)
    with pytest.raises(RuntimeError) as outside:
        elsewhere["compile_kernel"]()
    assert not devices["raised_in_triton"](outside.value)
    monkeypatch.undo()
    assert images_of(comfy_inprocess.run(graph(empty_image(), solid_mask(1.0))))[0].shape == (1, 64, 64, 3)


def test_the_loaders_say_what_is_wrong_with_a_bad_file(comfy_inprocess, comfy_models_dir):
    """The loaders read files with ComfyUI's safe loader; where it fails, the message is the pack's (a web page or
    Git LFS pointer saved instead of the weights, Python objects in a pickle), not torch's advice to load with
    weights_only=False; a state dict holding anything but tensors is refused by name."""
    from safetensors.torch import load_file

    folder = comfy_models_dir / "guided_diffusion"
    tiny = load_file(str(folder / harness.GD_TINY_NAME))
    files = {"bad-page.pt": b"<!DOCTYPE html><html><body>Sign in</body></html>",
             "bad-lfs.safetensors": b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    torch.save({**tiny, "step": 5}, folder / "bad-mixed.pt")
    # an object in the pickle (a training script's arguments): ComfyUI's weights_only load refuses it
    torch.save({"model": tiny, "args": argparse.Namespace(lr=1e-4)}, folder / "bad-object.pt")
    loader = comfy_inprocess.node_class_mappings["BlendedDiffusion_LoadGuidedDiffusion"]()
    expected = {"bad-page.pt": "this is a web page, not model weights",
                "bad-lfs.safetensors": "this is a Git LFS pointer, not the weights",
                "bad-mixed.pt": "is not a plain state dict: step hold(s) no tensor",
                "bad-object.pt": "the file contains Python objects, not just tensors"}
    try:
        for name, message in expected.items():
            with pytest.raises(ValueError) as error, torch.inference_mode():
                loader.load(name)
            assert message in str(error.value) and "weights_only" not in str(error.value), (name, error.value)
    finally:
        for name in expected:
            (folder / name).unlink()


def test_a_missing_model_file_says_where_to_put_it_and_how_to_fetch_it(comfy_inprocess, comfy_models_dir):
    for node, folder in (("BlendedDiffusion_LoadGuidedDiffusion", "guided_diffusion"),
                         ("BlendedDiffusion_LoadCLIP", "clip_guidance")):
        with pytest.raises(FileNotFoundError) as error:
            comfy_inprocess.node_class_mappings[node]().load("absent.safetensors")
        message = str(error.value)
        assert "'absent.safetensors' was not found" in message and str(comfy_models_dir / folder) in message
        assert "press R to refresh" in message and "python scripts/download_models.py --comfyui" in message


def test_a_missing_model_file_is_refused_when_queued_with_where_it_goes(comfy_inprocess, comfy_models_dir):
    """ComfyUI's own check would say only "value not in list": the loaders say where the file goes instead,
    before anything runs."""
    import harness

    prompt = harness.tiny_edit_prompt(comfy_inprocess.node_defs())
    prompt["3"]["inputs"]["model_name"] = "absent.safetensors"
    prompt["4"]["inputs"]["clip_name"] = "also-absent.safetensors"
    ok, error, _, node_errors = comfy_inprocess.validate(prompt)
    assert not ok
    reasons = " ".join(str(e) for e in node_errors.values())
    assert "'absent.safetensors' was not found" in reasons and "'also-absent.safetensors' was not found" in reasons
    assert "download_models.py" in reasons and "not in list" not in reasons
    assert comfy_inprocess.validate(harness.tiny_edit_prompt(comfy_inprocess.node_defs()))[0]


def test_lpips_that_cannot_load_is_refused_by_clip_guidance_naming_its_weight(comfy_inprocess, monkeypatch):
    import importlib.util

    import harness

    mappings = comfy_inprocess.node_class_mappings
    clip = mappings["BlendedDiffusion_LoadCLIP"]().load(harness.CLIP_TINY_NAME, "float32")[0]
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lpips" else find_spec(name, *a))
    guidance = mappings["BlendedDiffusion_CLIPGuidance"]()
    with pytest.raises(ValueError, match="pip install lpips.*background_lpips_lambda to 0"):
        guidance.build(clip, "a red rock", 1000.0, 50.0, 1, background_lpips_lambda=1000.0)
    assert guidance.build(clip, "a red rock", 1000.0, 50.0, 1)[0].settings.background_lpips_lambda == 0.0


def test_clip_guidance_names_the_image_target_masks_it_drops(comfy_inprocess, caplog):
    """Two reference pictures with three masks: core's rule drops the third, with a warning in the picture's
    words (not the Sampler's advice about editing one image in several places)."""
    mappings = comfy_inprocess.node_class_mappings
    clip = mappings["BlendedDiffusion_LoadCLIP"]().load(harness.CLIP_TINY_NAME, "float32")[0]
    guidance = mappings["BlendedDiffusion_CLIPGuidance"]()
    with caplog.at_level(logging.WARNING):
        spec = guidance.build(clip, "", 1000.0, 50.0, 1, image_target=torch.rand(2, 16, 16, 3),
                              image_target_mask=torch.ones(3, 16, 16))[0]
    assert spec.image_targets[0].mask.shape[0] == 2
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "Blended Diffusion: 3 masks for 2 reference pictures: the last 1 mask(s) are not used (the reference "
        "pictures decide; give one picture per mask, or one picture for all)"]

"""Model files kept the way ComfyUI users keep them: in subfolders, under odd names, behind links, renamed, from a
workflow saved on Windows. Each loads through the loader nodes, or is refused saying what the file is and what to
do. Every file is made under the test's tmp_path, in a folder put first in the loaders' model folders."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

import harness
from conftest import REF

GD_TINY = REF / "gd_tiny"
CLIP_TINY = REF / "clip_tiny"
UNET_NODE = "BlendedDiffusion_LoadGuidedDiffusion"
CLIP_NODE = "BlendedDiffusion_LoadCLIP"


@pytest.fixture
def folders(comfy_inprocess, tmp_path, monkeypatch):
    """Empty guided_diffusion and clip_guidance folders under tmp_path, searched before the workspace's."""
    import folder_paths

    made = {}
    for name in ("guided_diffusion", "clip_guidance"):
        made[name] = tmp_path / name
        made[name].mkdir()
        paths, extensions = folder_paths.folder_names_and_paths[name]
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name, ([str(made[name]), *paths], extensions))
        monkeypatch.delitem(folder_paths.filename_list_cache, name, raising=False)  # the old list comes back after
    yield made
    for name in made:  # the list made during the test names these files: not for the tests after this one
        folder_paths.filename_list_cache.pop(name, None)


def node(comfy_inprocess, name):
    return comfy_inprocess.node_class_mappings[name]


def listed(comfy_inprocess, name) -> list[str]:
    required = node(comfy_inprocess, name).INPUT_TYPES()["required"]
    return required["model_name" if name == UNET_NODE else "clip_name"][0]


def load(comfy_inprocess, name, file_name):
    loader = node(comfy_inprocess, name)()
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        if name == UNET_NODE:
            return loader.load(file_name)[0].unet
        return loader.load(file_name, "float32")[0].clip


@pytest.mark.comfy
def test_subfolders_odd_names_and_links_are_listed_and_load(comfy_inprocess, folders):
    gd = folders["guided_diffusion"]
    (gd / "fine tunes").mkdir()
    shutil.copyfile(GD_TINY / "model.safetensors", gd / "fine tunes" / "mödel v1.2.final.safetensors")
    shutil.copyfile(GD_TINY / "model.pt", gd / "UPPER.PT")
    shutil.copyfile(GD_TINY / "model.pt", gd / "released.ckpt")
    (gd / "linked.safetensors").symlink_to(GD_TINY / "model.safetensors")
    (gd / "linked folder").symlink_to(GD_TINY, target_is_directory=True)
    names = ["fine tunes/mödel v1.2.final.safetensors", "UPPER.PT", "released.ckpt", "linked.safetensors",
             "linked folder/model.pt"]
    assert set(names) <= set(listed(comfy_inprocess, UNET_NODE))
    for name in names:
        assert node(comfy_inprocess, UNET_NODE).VALIDATE_INPUTS(name) is True
        assert str(gd) in node(comfy_inprocess, UNET_NODE).IS_CHANGED(name)
        assert load(comfy_inprocess, UNET_NODE, name).state_dict()["out.2.bias"].shape == (6,)


@pytest.mark.comfy
def test_a_subfolder_file_named_as_on_windows_loads(comfy_inprocess, folders):
    """ComfyUI on Windows lists "sub\\name.pt": a workflow saved there was told here that a file it could see in
    the list was not found, and to put it in the folder."""
    for kind, source in ((UNET_NODE, GD_TINY), (CLIP_NODE, CLIP_TINY)):
        folder = folders["guided_diffusion" if kind == UNET_NODE else "clip_guidance"] / "sub"
        folder.mkdir()
        shutil.copyfile(source / "model.safetensors", folder / "tiny.safetensors")
        cls = node(comfy_inprocess, kind)
        assert cls.VALIDATE_INPUTS("sub\\tiny.safetensors") is True
        assert cls.IS_CHANGED("sub\\tiny.safetensors") == cls.IS_CHANGED("sub/tiny.safetensors") != ""
        assert load(comfy_inprocess, kind, "sub\\tiny.safetensors") is not None
    # and ComfyUI's own check of the queued prompt takes the names, though its lists say "sub/tiny.safetensors"
    prompt = harness.tiny_edit_prompt(comfy_inprocess.node_defs())
    prompt["3"]["inputs"]["model_name"] = prompt["4"]["inputs"]["clip_name"] = "sub\\tiny.safetensors"
    assert comfy_inprocess.validate(prompt)[0]


@pytest.mark.comfy
@pytest.mark.parametrize("kind", [UNET_NODE, CLIP_NODE])
def test_a_checkpoint_renamed_between_pt_and_safetensors_loads(comfy_inprocess, folders, kind):
    """The library reads a file by its content; the loaders handed it to ComfyUI's reader, which goes by the name,
    and refused it ("cannot be read as a model file", quoting torch's advice to load with weights_only=False) or
    failed with safetensors' bare "header too large"."""
    source, folder = (GD_TINY, folders["guided_diffusion"]) if kind == UNET_NODE else (CLIP_TINY,
                                                                                       folders["clip_guidance"])
    shutil.copyfile(source / "model.safetensors", folder / "was_safetensors.pt")
    shutil.copyfile(source / "model.pt", folder / "was_pt.safetensors")
    shutil.copyfile(source / "model.pt", folder / "was_pt.sft")
    expected = torch.load(source / "model.pt", weights_only=True)
    for name in ("was_safetensors.pt", "was_pt.safetensors", "was_pt.sft"):
        model = load(comfy_inprocess, kind, name)
        weights = (model if kind == UNET_NODE else model.model).state_dict()
        key = "out.2.weight" if kind == UNET_NODE else "visual.proj"
        assert torch.equal(weights[key], expected[key].float()), name


@pytest.mark.comfy
def test_a_broken_link_and_a_folder_named_like_a_model_say_what_they_are(comfy_inprocess, folders, tmp_path):
    """A link whose drive is not mounted is in the list; it was "not found" with advice to put the file there."""
    gd = folders["guided_diffusion"]
    target = tmp_path / "unmounted" / "256x256_diffusion_uncond.pt"
    (gd / "256x256_diffusion_uncond.pt").symlink_to(target)
    (gd / "model.pt").mkdir()
    cls = node(comfy_inprocess, UNET_NODE)
    assert "256x256_diffusion_uncond.pt" in listed(comfy_inprocess, UNET_NODE)
    message = cls.VALIDATE_INPUTS("256x256_diffusion_uncond.pt")
    assert f"is a link to {str(target)!r}, which does not exist" in message and "Put the file there" not in message
    with pytest.raises(FileNotFoundError, match="which does not exist"):
        cls().load("256x256_diffusion_uncond.pt")
    message = cls.VALIDATE_INPUTS("model.pt")
    assert "is a folder" in message and "not a model file" in message
    assert cls.IS_CHANGED("model.pt") == ""
    # a name that is nowhere keeps the message that says where the file goes and how to fetch it
    assert "download_models.py" in cls.VALIDATE_INPUTS("absent.pt")


def test_a_bfloat16_clip_is_not_rounded_through_float16(tmp_path):
    """open_clip's builder loads into float16: a bfloat16 file (float32's range) came out with small weights rounded
    and large ones infinite, silently."""
    from blended.clip_model import load_guidance_clip

    weights = {k: v.float().bfloat16() for k, v in torch.load(CLIP_TINY / "model.pt", weights_only=True).items()}
    proj = weights["visual.proj"].clone()
    proj.view(-1)[:2] = torch.tensor([3e-7, 1e5])
    weights["visual.proj"] = proj
    path = tmp_path / "clip_bf16.safetensors"
    save_file(weights, str(path))
    clip = load_guidance_clip(path)
    assert torch.equal(clip.model.visual.proj, proj.float())
    assert all(bool(torch.isfinite(p).all()) for p in clip.model.parameters())


def test_what_comfyui_users_put_in_the_clip_folder_by_mistake_is_refused_with_what_to_use(tmp_path):
    """ComfyUI's models/clip and models/clip_vision files are Hugging Face CLIPs."""
    from blended.clip_model import load_guidance_clip
    from blended.errors import CheckpointError

    path = tmp_path / "clip_vision_vit_b16.safetensors"
    save_file({"vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 2, 2),
               "visual_projection.weight": torch.zeros(2, 4)}, str(path))
    with pytest.raises(CheckpointError) as error:
        load_guidance_clip(path)
    message = str(error.value)
    assert path.name in message and "Hugging Face" in message and "ViT-B-16.safetensors" in message


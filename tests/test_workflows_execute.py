"""The shipped UI-format workflows really run: converted to API prompts and executed by ComfyUI in-process.

Also checks the UI -> API converter itself on a hand-built workflow, since every workflow test and the
browser cross-check rest on it.
"""

from __future__ import annotations

import pytest
import torch

import harness
import workflow_format

# ------------------------------------------------------------------------ converter, no ComfyUI needed

NODE_DEFS = {
    "LoadImage": {"input": {"required": {"image": [["a.png", "blended_example_img.png"], {"image_upload": True}]}},
                  "input_order": {"required": ["image"]}},
    "ImageInvert": {"input": {"required": {"image": ["IMAGE", {}]}}, "input_order": {"required": ["image"]}},
    "SaveImage": {"input": {"required": {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {"default": "C"}]},
                            "hidden": {"prompt": "PROMPT"}},
                  "input_order": {"required": ["images", "filename_prefix"], "hidden": ["prompt"]}},
    "Seeded": {"input": {"required": {"image": ["IMAGE", {}],
                                      "seed": ["INT", {"default": 0, "control_after_generate": True}],
                                      "steps": ["INT", {"default": 20}],
                                      "noise_seed": ["INT", {"default": 0}],
                                      "scale": ["FLOAT", {"default": 1.0}],
                                      "text": ["STRING", {"multiline": True}],
                                      "extra": ["FLOAT", {"forceInput": True}]},
                         "optional": {"method": [["ddpm", "ddim"], {}], "flag": ["BOOLEAN", {}]}},
               "input_order": {"required": ["image", "seed", "steps", "noise_seed", "scale", "text", "extra"],
                               "optional": ["method", "flag"]}},
}


def _node(node_id, type_, inputs=(), outputs=(), widgets=None, mode=0, order=0):
    return {"id": node_id, "type": type_, "mode": mode, "order": order, "inputs": list(inputs),
            "outputs": list(outputs), "widgets_values": widgets if widgets is not None else [], "properties": {}}


def _sample_ui_workflow():
    nodes = [
        _node(1, "LoadImage", outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [1, 4]}],
              widgets=["blended_example_img.png", "image"]),
        _node(2, "ImageInvert", inputs=[{"name": "image", "type": "IMAGE", "link": 1}],
              outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [2]}], mode=workflow_format.MODE_BYPASSED),
        _node(3, "Reroute", inputs=[{"name": "", "type": "*", "link": 2}],
              outputs=[{"name": "", "type": "IMAGE", "links": [3]}]),
        _node(4, "SaveImage", inputs=[{"name": "images", "type": "IMAGE", "link": 3}], widgets=["pfx"]),
        _node(5, "Note", widgets=["a note"]),
        _node(6, "ImageInvert", inputs=[{"name": "image", "type": "IMAGE", "link": 4}],
              outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [6]}], mode=workflow_format.MODE_MUTED),
        _node(7, "Seeded", inputs=[{"name": "image", "type": "IMAGE", "link": 6},
                                   {"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": 5}],
              widgets=[42, "randomize", 3, 7, "fixed", 2.5, "hello", "ddim", True]),
        _node(8, "PrimitiveNode", outputs=[{"name": "INT", "type": "INT", "links": [5]}], widgets=[3, "fixed"]),
    ]
    links = [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 0, 4, 0, "IMAGE"],
             [4, 1, 0, 6, 0, "IMAGE"], [5, 8, 0, 7, 1, "INT"], [6, 6, 0, 7, 0, "IMAGE"]]
    return {"nodes": nodes, "links": links, "version": 0.4}


def test_ui_to_api_handles_widgets_links_bypass_mute_and_virtual_nodes():
    prompt = workflow_format.ui_to_api(_sample_ui_workflow(), NODE_DEFS)
    assert prompt == {
        "1": {"class_type": "LoadImage", "inputs": {"image": "blended_example_img.png"}},
        # Bypassed ImageInvert and the reroute are wired through to the LoadImage output.
        "4": {"class_type": "SaveImage", "inputs": {"filename_prefix": "pfx", "images": ["1", 0]}},
        # seed and noise_seed are followed by their control value; `steps` keeps the primitive's value;
        # the image input fed by a muted node is dropped, as the frontend does.
        "7": {"class_type": "Seeded", "inputs": {"seed": 42, "steps": 3, "noise_seed": 7, "scale": 2.5,
                                                 "text": "hello", "method": "ddim", "flag": True}},
    }


def test_ui_to_api_accepts_object_links_and_dict_widget_values():
    workflow = _sample_ui_workflow()
    workflow["links"] = [{"id": link[0], "origin_id": link[1], "origin_slot": link[2], "target_id": link[3],
                          "target_slot": link[4], "type": link[5]} for link in workflow["links"]]
    workflow["nodes"][3]["widgets_values"] = {"filename_prefix": "named"}
    prompt = workflow_format.ui_to_api(workflow, NODE_DEFS)
    assert prompt["4"]["inputs"] == {"filename_prefix": "named", "images": ["1", 0]}


def test_ui_to_api_refuses_unknown_node_types():
    workflow = _sample_ui_workflow()
    workflow["nodes"].append(_node(9, "NoSuchNode"))
    with pytest.raises(workflow_format.WorkflowConversionError, match="NoSuchNode"):
        workflow_format.ui_to_api(workflow, NODE_DEFS)


# ------------------------------------------------------------------------------- in-process ComfyUI


@pytest.mark.comfy
def test_in_process_harness_runs_a_core_workflow(comfy_inprocess):
    workflow = _sample_ui_workflow()
    workflow["nodes"] = [n for n in workflow["nodes"] if n["id"] in (1, 2, 3, 4)]
    workflow["nodes"][1]["mode"] = 0  # the invert now really runs
    prompt = workflow_format.ui_to_api(workflow, comfy_inprocess.node_defs())
    outputs, tensors = comfy_inprocess.run(prompt)
    source, inverted = tensors["1"][0][0], tensors["2"][0][0]
    assert source.shape == (1, 256, 256, 3)
    assert torch.allclose(inverted, 1.0 - source)
    assert len(outputs["4"]["images"]) == 1


def test_the_pack_ships_workflows():
    assert harness.workflow_files(), "workflows/ holds no *.json example workflow"


@pytest.mark.comfy
@pytest.mark.parametrize("path", harness.workflow_files(), ids=lambda p: p.name)
def test_shipped_workflow_executes(path, comfy_inprocess):
    workflow = harness.load_workflow(path)
    node_defs = comfy_inprocess.node_defs()
    missing = workflow_format.node_types_used(workflow) - set(node_defs)
    assert not missing, f"{path.name} uses node types ComfyUI does not know: {sorted(missing)}"
    prompt = harness.shrink_prompt(workflow_format.ui_to_api(workflow, node_defs))
    assert any(entry["class_type"] == harness.SAMPLER for entry in prompt.values()) or \
        any(entry["class_type"].startswith("BlendedDiffusion_") for entry in prompt.values()), \
        f"{path.name} does not use the pack's nodes"

    outputs, tensors = comfy_inprocess.run(prompt)

    output_images = [image for output in outputs.values() for image in output.get("images", [])]
    assert output_images, f"{path.name} produced no output image"
    for image in output_images:
        folder = comfy_inprocess.workspace.output_dir if image["type"] == "output" \
            else comfy_inprocess.workspace.temp_dir
        assert (folder / image.get("subfolder", "") / image["filename"]).is_file(), image

    for node_id, entry in prompt.items():
        if entry["class_type"] != harness.SAMPLER:
            continue
        _check_sampler_outputs(path.name, node_id, entry, tensors)


def _check_sampler_outputs(name, node_id, entry, tensors, results=None):
    """Generic checks of one sampler's outputs; `results`, when given, is the exact batch of its images."""
    images, mask = tensors[node_id][0][0], tensors[node_id][1][0]
    source_id, source_slot = entry["inputs"]["image"]
    source = tensors[source_id][source_slot][0]
    num_results = int(entry["inputs"]["num_results"])
    assert images.ndim == 4 and images.shape[-1] == 3, (name, images.shape)
    assert images.shape[1:3] == source.shape[1:3], f"{name}: result size {images.shape} != input {source.shape}"
    assert images.shape[0] % num_results == 0
    if results is not None:
        assert images.shape[0] == results
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    if entry["inputs"].get("enforce_background", False) and source.shape[0] == 1:
        keep = (mask.reshape(-1, *mask.shape[-2:])[:1] == 0).unsqueeze(-1).expand_as(source)
        assert keep.any(), f"{name}: the mask covers the whole image"
        for result in images:
            assert torch.allclose(result.unsqueeze(0)[keep], source[keep], atol=1e-4), \
                f"{name}: pixels outside the mask changed"


@pytest.mark.comfy
def test_tiny_edit_in_process_returns_full_size_results_and_keeps_the_background(comfy_inprocess, monkeypatch):
    """Also the frames output: every second step's pred_xstart (as the library's step callback sees it, at model
    resolution) and the last step's, mapped to 0..1, all frames of result 0 then those of result 1."""
    sampler = comfy_inprocess.pack_module("sampler")
    edit_image, preds = sampler.edit_image, []

    def recording_edit_image(*args, callback=None, **kwargs):
        def record(step, total, pred):
            preds.append(pred.detach().float().cpu().clone())
            if callback is not None:
                callback(step, total, pred)
        return edit_image(*args, callback=record, **kwargs)

    monkeypatch.setattr(sampler, "edit_image", recording_edit_image)
    node_defs = comfy_inprocess.node_defs()
    prompt = harness.tiny_edit_prompt(node_defs, seed=5, num_results=2, batch_size=2, capture_every=2,
                                      enforce_background=True)
    outputs, tensors = comfy_inprocess.run(prompt)
    images, mask, frames = (slot[0] for slot in tensors["6"])
    source = tensors["1"][0][0]
    assert images.shape == (2, 256, 256, 3)
    steps = 6 - 1  # respacing 6, skip_timesteps 1: one batch of both results
    assert len(preds) == steps and preds[0].shape[0] == 2
    captured = [n for n in range(steps) if n % 2 == 0 or n == steps - 1]
    expected = torch.stack([((preds[n][r] + 1) / 2).clamp(0, 1).movedim(0, -1) for r in range(2) for n in captured])
    torch.testing.assert_close(frames, expected, atol=0, rtol=0)
    assert frames.std() > 0.01  # pictures, not a constant
    assert len(outputs["7"]["images"]) == 2
    _check_sampler_outputs("tiny edit", "6", prompt["6"], tensors, results=2)
    edit = (mask.reshape(-1, 256, 256)[0] > 0.5).unsqueeze(-1).expand(256, 256, 3)
    assert (images[0][edit] - source[0][edit]).abs().mean() > 1e-3, "nothing was edited inside the mask"


@pytest.mark.comfy
def test_committed_workflows_are_what_the_generator_writes(comfy_inprocess):
    """workflows/*.json are generated from the live node definitions; a node change must regenerate them
    (`PYTHONPATH=. .venv/bin/python scripts/make_workflows.py`), or users would open stale widget values."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("make_workflows", harness.REPO_ROOT / "scripts" / "make_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    expected = module.build_all(comfy_inprocess.node_defs())
    committed = {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in harness.workflow_files()}
    assert sorted(committed) == sorted(expected)
    for name, workflow in expected.items():
        assert committed[name] == json.loads(json.dumps(workflow)), f"workflows/{name}.json is stale"


@pytest.mark.parametrize("name", ["08_chain_core_compositing.json", "15_edit_metrics.json",
                                  "17_soft_mask.json"])
def test_the_workflows_soft_edges_are_grey_and_blend_only_at_the_border(name, comfy_inprocess):
    """Core FeatherMask fades the picture's frame, not a mask's edge: the workflows' soft edges must be grey
    where the mask's edge is, and a core composite through one changes the results only there."""
    workflow = harness.load_workflow(harness.REPO_ROOT / "workflows" / name)
    prompt = harness.shrink_prompt(workflow_format.ui_to_api(workflow, comfy_inprocess.node_defs()))
    _, tensors = comfy_inprocess.run(prompt)
    of_type = {kind: [node_id for node_id, entry in prompt.items() if entry["class_type"] == kind]
               for kind in ("ImageToMask", "ImageCompositeMasked", harness.SAMPLER)}
    edge = tensors[of_type["ImageToMask"][0]][0][0]
    grey = (edge > 0.01) & (edge < 0.99)
    assert int(grey.sum()) > 500, f"{name}: the soft edge has only {int(grey.sum())} grey pixels"
    for composite_id in of_type["ImageCompositeMasked"]:
        sampler_id = of_type[harness.SAMPLER][0]
        results, mask = tensors[sampler_id][0][0], tensors[sampler_id][1][0]
        blended = tensors[composite_id][0][0]
        assert blended.shape == results.shape, name
        changed = (blended - results).abs().amax(dim=-1) > 1e-6
        assert bool(changed.any()), f"{name}: the composite is the sampler's results unchanged"
        assert not bool(changed[mask == 0].any()), f"{name}: the composite changed pixels outside the mask"

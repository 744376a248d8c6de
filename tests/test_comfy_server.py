"""The pack inside a real ComfyUI server (`main.py --cpu`), spoken to over HTTP and the websocket.

These catch what unit tests cannot: import failures ComfyUI only logs, node definitions as the frontend
sees them, progress messages, interruption, and memory growth over many prompts.
"""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

import harness

pytestmark = [pytest.mark.comfy, pytest.mark.server]

# The node contract (ids and output types) the workflows and users rely on.
EXPECTED_NODES = {
    "BlendedDiffusion_LoadGuidedDiffusion": ["GUIDED_DIFFUSION_MODEL"],
    "BlendedDiffusion_LoadCLIP": ["GUIDANCE_CLIP"],
    "BlendedDiffusion_CLIPGuidance": ["CLIP_GUIDANCE"],
    "BlendedDiffusion_Sampler": ["IMAGE", "MASK", "IMAGE"],
    "BlendedDiffusion_CLIPRank": ["IMAGE", "IMAGE", "STRING"],
    "BlendedDiffusion_Speed": ["FAST_PATH_OPTIONS"],
}


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return harness.ComfyClient(comfy_server.base_url).object_info()


def _our_nodes(object_info):
    return {name: info for name, info in object_info.items() if name.startswith("BlendedDiffusion_")}


def _load_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_server_log_has_no_import_failure(comfy_server):
    log_text = comfy_server.log_text()
    assert harness.custom_node_import_failures(log_text.splitlines()) == []
    # The import-times table lists the pack, so it really was loaded (not merely absent from the log).
    assert any(harness.PACK_DIR_NAME in line and "seconds" in line for line in log_text.splitlines()), \
        harness.tail(log_text)


def test_object_info_lists_the_node_contract(object_info):
    ours = _our_nodes(object_info)
    missing = set(EXPECTED_NODES) - set(ours)
    assert not missing, f"missing nodes: {sorted(missing)}; found {sorted(ours)}"
    for name, outputs in EXPECTED_NODES.items():
        assert list(ours[name]["output"]) == outputs, name
    for name, info in ours.items():
        assert info["category"].split("/")[0] == "BlendedDiffusion", name
        assert info["display_name"].startswith("Blended Diffusion: "), name  # found by one node search


def test_every_input_has_a_tooltip_and_every_node_a_description(object_info):
    problems = []
    for name, info in _our_nodes(object_info).items():
        if not str(info.get("description") or "").strip():
            problems.append(f"{name}: no DESCRIPTION")
        for section in ("required", "optional"):
            for input_name, spec in info["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if not str(options.get("tooltip") or "").strip():
                    problems.append(f"{name}.{input_name}: no tooltip")
    assert not problems, "\n".join(problems)


def test_shipped_workflows_are_offered_as_the_packs_templates(comfy_client):
    """ComfyUI lists a pack's `workflows/` folder in its template browser (under the pack's folder name) and serves
    each file from it: every shipped workflow is listed and comes back as it is in the repository."""
    shipped = {path.stem: path for path in harness.workflow_files()}
    listed = comfy_client.get_json("/workflow_templates")
    assert sorted(listed.get(harness.PACK_DIR_NAME, [])) == sorted(shipped), listed
    for name, path in shipped.items():
        status, _, body = comfy_client.get_bytes(f"/api/workflow_templates/{harness.PACK_DIR_NAME}/{name}.json")
        assert status == 200 and json.loads(body) == json.loads(path.read_text()), name


def test_model_folders_list_the_tiny_models(object_info):
    gd = object_info["BlendedDiffusion_LoadGuidedDiffusion"]["input"]["required"]["model_name"][0]
    clip = object_info["BlendedDiffusion_LoadCLIP"]["input"]["required"]["clip_name"][0]
    assert harness.GD_TINY_NAME in gd
    assert harness.CLIP_TINY_NAME in clip


def test_unknown_model_name_is_refused_at_validation(comfy_client, object_info):
    prompt = harness.tiny_edit_prompt(object_info)
    prompt["3"]["inputs"]["model_name"] = "no_such_model.pt"
    status, body = comfy_client.post_json("/prompt", {"prompt": prompt, "client_id": comfy_client.client_id})
    assert status == 400
    assert "3" in body["node_errors"], body


def test_prompt_runs_with_progress_history_and_view(comfy_client, object_info):
    prompt = harness.tiny_edit_prompt(object_info, seed=11, num_results=2)
    prompt_id, messages = comfy_client.run_prompt(prompt, timeout=300)

    types = [m["type"] for m in messages]
    assert "execution_success" in types, types
    progress = [m["data"] for m in messages if m["type"] == "progress" and m["data"].get("node") == "6"]
    assert progress, f"no progress message for the sampler node: {types}"
    assert progress[-1]["value"] == progress[-1]["max"] > 1
    values = [p["value"] for p in progress]
    assert values == sorted(values)

    images = comfy_client.output_images(prompt_id)
    assert len(images) == 2
    source = _load_png((harness.FIXTURES / "examples" / "img.png").read_bytes())
    keep = _load_png((harness.FIXTURES / "examples" / "mask.png").read_bytes())[..., 0] < 128
    assert keep.any() and (~keep).any()
    for image in images:
        assert image["type"] == "output"
        result = _load_png(comfy_client.view(image))
        assert result.shape == source.shape
        # Outside the mask the photo survives (8-bit rounding aside) and inside it something changed.
        assert np.abs(result[keep] - source[keep]).max() <= 2
        assert np.abs(result[~keep] - source[~keep]).mean() > 1


def test_interrupt_stops_the_sampler_within_a_few_steps(comfy_client, comfy_server, object_info):
    long_prompt = harness.tiny_edit_prompt(object_info, seed=21, respacing="1000", skip_timesteps=0)
    prompt_id = comfy_client.queue_prompt(long_prompt)
    state = {"interrupted_at": None, "sent_at": None}

    def on_message(message):
        data = message.get("data") or {}
        if message["type"] == "progress" and data.get("node") == "6" and state["sent_at"] is None \
                and data["value"] >= 2:
            state["interrupted_at"] = data["value"]
            state["sent_at"] = time.monotonic()
            threading.Thread(target=comfy_client.interrupt, daemon=True).start()

    messages = comfy_client.wait_for_prompt(prompt_id, timeout=300, on_message=on_message)
    types = [m["type"] for m in messages]
    assert state["sent_at"] is not None, f"the sampler never reported progress: {types}"
    assert "execution_interrupted" in types, types
    assert "execution_success" not in types
    stopped_after = time.monotonic() - state["sent_at"]
    last_step = max(m["data"]["value"] for m in messages
                    if m["type"] == "progress" and m["data"].get("node") == "6")
    assert last_step - state["interrupted_at"] <= 3, (state, last_step)
    assert last_step < 1000
    assert stopped_after < 30, stopped_after
    interrupted = next(m["data"] for m in messages if m["type"] == "execution_interrupted")
    assert interrupted["node_id"] == "6"

    # The server is still usable: the next prompt runs normally.
    next_id, next_messages = comfy_client.run_prompt(harness.tiny_edit_prompt(object_info, seed=22), timeout=300)
    assert "execution_success" in [m["type"] for m in next_messages]
    assert len(comfy_client.output_images(next_id)) == 1


@pytest.mark.slow
def test_thirty_prompts_finish_and_memory_does_not_keep_growing(comfy_client, comfy_server, object_info):
    import psutil  # ComfyUI itself requires it
    process = psutil.Process(comfy_server.pid)
    deadline = time.monotonic() + 600
    rss = {}
    for i in range(1, 31):
        prompt = harness.tiny_edit_prompt(object_info, seed=1000 + i, respacing="3", skip_timesteps=1)
        prompt_id, messages = comfy_client.run_prompt(prompt, timeout=max(deadline - time.monotonic(), 1))
        assert "execution_success" in [m["type"] for m in messages], i
        images = comfy_client.output_images(prompt_id)
        assert len(images) == 1, i
        assert _load_png(comfy_client.view(images[0])).shape == (256, 256, 3)
        rss[i] = process.memory_info().rss
    growth = rss[30] - rss[10]
    allowed = max(150 * 2**20, rss[10] // 10)
    assert growth < allowed, f"RSS grew {growth / 2**20:.0f} MiB between prompt 10 and 30 ({rss})"

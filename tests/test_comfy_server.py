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


# ---- the run lifecycle as a user drives it: free, re-queue, queue while running, interrupt, cancel pending

SAMPLER_NODE = "6"  # tiny_edit_prompt's node ids
# An edit long enough (30 steps, about 3 s on two cores) that the requests a test sends once it has begun to
# sample (a handful, each a few milliseconds) certainly arrive before it ends, on a loaded machine too.
LONG = {"respacing": "30", "skip_timesteps": 0}


def _types(messages) -> list[str]:
    return [m["type"] for m in messages]


def _cached_nodes(messages) -> set[str]:
    """The nodes ComfyUI served from its output cache for this prompt (its one `execution_cached` message)."""
    cached = [m["data"]["nodes"] for m in messages if m["type"] == "execution_cached"]
    assert len(cached) == 1, _types(messages)
    return set(cached[0])


def _sampler_steps(messages) -> list[tuple[int, int]]:
    return [(m["data"]["value"], m["data"]["max"]) for m in messages
            if m["type"] == "progress" and m["data"].get("node") == SAMPLER_NODE]


def _sampled_in_full(messages) -> bool:
    """The sampler really ran (not served from the cache) and to its last step."""
    steps = _sampler_steps(messages)
    return SAMPLER_NODE not in _cached_nodes(messages) and bool(steps) and steps[-1][0] == steps[-1][1] > 1


def _succeeded(messages) -> bool:
    types = _types(messages)
    return "execution_success" in types and "execution_error" not in types and "execution_interrupted" not in types


def _pixels(client, prompt_id) -> list[np.ndarray]:
    return [_load_png(client.view(image)) for image in client.output_images(prompt_id)]


def _assert_same_images(actual: list[np.ndarray], expected: list[np.ndarray], what: str) -> None:
    assert len(actual) == len(expected) > 0, what
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.shape == e.shape, f"{what}: image {i}"
        assert np.array_equal(a, e), f"{what}: image {i} differs by up to {np.abs(a - e).max()}"


def _on_first_sampler_step(action, min_step: int = 1):
    """An on_message hook calling ``action(step)`` once, when the sampler (node 6) reports a step >= min_step:
    the prompt is then certainly running. Returns (hook, record of what action returned)."""
    done: list = []

    def hook(message):
        data = message.get("data") or {}
        if not done and message["type"] == "progress" and data.get("node") == SAMPLER_NODE \
                and data["value"] >= min_step:
            done.append(action(data["value"]))

    return hook, done


def test_free_models_and_node_cache_then_the_same_prompt_runs_again_alike(comfy_client, object_info):
    """The frontend's "Free model and node cache" ({unload_models, free_memory} on /free), then the same prompt
    queued again: every node runs again (the loaders read the files anew) and the edit is the same, bit for bit.

    ComfyUI's worker applies /free between prompts: posted while the first edit samples, it takes effect the
    moment that run ends, so the re-queued prompt certainly finds the models unloaded and the cache empty (posted
    while idle, it would race the next /prompt)."""
    prompt = harness.tiny_edit_prompt(object_info, seed=31, text="a mossy stone", **LONG)
    hook, posted = _on_first_sampler_step(lambda _: comfy_client.free(unload_models=True, free_memory=True))
    first_id, first = comfy_client.run_prompt(prompt, timeout=300, on_message=hook)
    assert posted == [200], _types(first)
    assert _succeeded(first) and _sampled_in_full(first), _types(first)

    again_id, again = comfy_client.run_prompt(prompt, timeout=300)
    assert _succeeded(again), _types(again)
    assert _cached_nodes(again) == set(), "after /free every node must run again, none come from the cache"
    assert _sampled_in_full(again), _sampler_steps(again)
    _assert_same_images(_pixels(comfy_client, again_id), _pixels(comfy_client, first_id),
                        "the same prompt after /free")

    # The control: without /free the same prompt is served whole from the cache, no step sampled.
    cached_id, cached = comfy_client.run_prompt(prompt, timeout=300)
    assert _succeeded(cached) and _cached_nodes(cached) == set(prompt), _types(cached)
    assert _sampler_steps(cached) == []
    _assert_same_images(_pixels(comfy_client, cached_id), _pixels(comfy_client, first_id), "the cached re-run")


def test_unload_models_keeps_the_node_cache_and_the_next_edit_loads_them_again(comfy_client, object_info):
    """The frontend's "Unload models" ({unload_models} alone): ComfyUI unloads the models but keeps the loaders'
    outputs cached, so the next edit samples with model objects ComfyUI unloaded, which must load again and give
    what they gave before. (Under --cpu, unloading leaves the weights where they are: there the test holds the
    node cache and the result.)"""
    edit = harness.tiny_edit_prompt(object_info, seed=33)
    before_id, before = comfy_client.run_prompt(edit, timeout=300)
    assert _succeeded(before), _types(before)

    other = harness.tiny_edit_prompt(object_info, seed=32, **LONG)  # evicts `edit`'s sampler output
    hook, posted = _on_first_sampler_step(lambda _: comfy_client.free(unload_models=True, free_memory=False))
    _, during = comfy_client.run_prompt(other, timeout=300, on_message=hook)
    assert posted == [200] and _succeeded(during), _types(during)

    after_id, after = comfy_client.run_prompt(edit, timeout=300)
    assert _succeeded(after), _types(after)
    assert {"1", "2", "3", "4", "5"} <= _cached_nodes(after), "unloading models must not empty the node cache"
    assert _sampled_in_full(after), _sampler_steps(after)
    _assert_same_images(_pixels(comfy_client, after_id), _pixels(comfy_client, before_id),
                        "the edit after the models were unloaded")


def test_prompts_queued_while_one_runs_finish_in_order_with_their_own_results(comfy_client, object_info):
    """A second and third prompt (other text, other seed) queued while the first samples: all three run, one after
    the other in queue order, each giving what it gives when queued alone."""
    order = ("first", "other_text", "other_seed")
    edits = {"first": harness.tiny_edit_prompt(object_info, seed=41, text="a red rock", **LONG),
             "other_text": harness.tiny_edit_prompt(object_info, seed=41, text="a blue pond"),
             "other_seed": harness.tiny_edit_prompt(object_info, seed=42, text="a red rock")}
    alone = {}
    for name in order:
        prompt_id, messages = comfy_client.run_prompt(edits[name], timeout=300)
        assert _succeeded(messages), (name, _types(messages))
        alone[name] = _pixels(comfy_client, prompt_id)
    # The three really are different edits, so a mix-up would show.
    assert not np.array_equal(alone["first"][0], alone["other_text"][0])
    assert not np.array_equal(alone["first"][0], alone["other_seed"][0])

    ids: dict[str, str] = {}

    def queue_the_others(_step):
        ids["other_text"] = comfy_client.queue_prompt(edits["other_text"])
        ids["other_seed"] = comfy_client.queue_prompt(edits["other_seed"])
        return comfy_client.queue()

    hook, queue_state = _on_first_sampler_step(queue_the_others)
    ids["first"] = comfy_client.queue_prompt(edits["first"])
    messages = {"first": comfy_client.wait_for_prompt(ids["first"], timeout=300, on_message=hook)}
    assert queue_state, _types(messages["first"])
    running, pending = queue_state[0]
    assert running == [ids["first"]] and sorted(pending) == sorted([ids["other_text"], ids["other_seed"]]), \
        (queue_state, ids)
    # The queued ones start only after the first has ended, so none of their messages went by unread.
    ended = comfy_client.wait_for_prompts([ids[name] for name in order[1:]], timeout=300)
    assert list(ended) == [ids[name] for name in order[1:]], f"they ended out of queue order: {list(ended)}, {ids}"
    messages.update({name: ended[ids[name]] for name in order[1:]})

    spans = []
    for name in order:
        assert _succeeded(messages[name]), (name, _types(messages[name]))
        assert _sampled_in_full(messages[name]), (name, _cached_nodes(messages[name]))
        _assert_same_images(_pixels(comfy_client, ids[name]), alone[name], f"{name} queued behind a running prompt")
        stamps = {event: data["timestamp"] for event, data in comfy_client.history(ids[name])["status"]["messages"]}
        spans.append((stamps["execution_start"], stamps["execution_success"]))
    for (_, ended), (started, _) in zip(spans, spans[1:], strict=False):
        assert ended <= started, f"prompts overlapped or ran out of order: {spans}"


def test_interrupted_edit_queued_again_at_once_gives_the_full_result(comfy_client, object_info):
    """Cancel (/interrupt) mid-edit, then Queue the same prompt again straight away: it samples from the start to
    the last step and gives the uninterrupted edit, nothing of the cancelled run (partial state, a stale interrupt
    flag) carried over."""
    edit = harness.tiny_edit_prompt(object_info, seed=51, **LONG)
    reference_id, reference = comfy_client.run_prompt(edit, timeout=300)
    assert _succeeded(reference) and _sampled_in_full(reference), _types(reference)
    # Another seed evicts the reference from the cache, so the prompt below samples again.
    _, other = comfy_client.run_prompt(harness.tiny_edit_prompt(object_info, seed=52, respacing="3"), timeout=300)
    assert _succeeded(other), _types(other)

    def cancel(step):
        comfy_client.interrupt()
        return step

    hook, cancelled_at = _on_first_sampler_step(cancel, min_step=2)
    cancelled_id = comfy_client.queue_prompt(edit)
    cancelled = comfy_client.wait_for_prompt(cancelled_id, timeout=300, on_message=hook)
    assert cancelled_at and "execution_interrupted" in _types(cancelled), _types(cancelled)
    steps = _sampler_steps(cancelled)
    assert steps[-1][0] < steps[-1][1], f"the edit ran to its end before the interrupt: {steps[-1]}"
    assert comfy_client.output_images(cancelled_id) == []

    again_id, again = comfy_client.run_prompt(edit, timeout=300)
    assert _succeeded(again), _types(again)
    assert _sampled_in_full(again) and _sampler_steps(again)[0][0] <= 1, _sampler_steps(again)
    assert _sampler_steps(again)[-1] == _sampler_steps(reference)[-1]
    _assert_same_images(_pixels(comfy_client, again_id), _pixels(comfy_client, reference_id),
                        "the edit queued again after an interrupt")


def test_prompts_taken_off_the_queue_never_run_and_the_running_one_finishes(comfy_client, object_info):
    """While an edit samples, two more are queued; one is cancelled from the queue panel (/queue delete), then
    the queue is cleared (/queue clear): the running edit finishes normally, neither pending one ever runs, and
    the cleared prompt queued again later runs as usual."""
    running = harness.tiny_edit_prompt(object_info, seed=61, **LONG)
    deleted = harness.tiny_edit_prompt(object_info, seed=62)
    cleared = harness.tiny_edit_prompt(object_info, seed=63)
    ids: dict[str, str] = {}
    states: dict[str, tuple] = {}

    def edit_the_queue(_step):
        ids["deleted"] = comfy_client.queue_prompt(deleted)
        ids["cleared"] = comfy_client.queue_prompt(cleared)
        assert comfy_client.edit_queue(delete=[ids["deleted"]]) == 200
        states["after_delete"] = comfy_client.queue()
        assert comfy_client.edit_queue(clear=True) == 200
        states["after_clear"] = comfy_client.queue()
        return True

    hook, edited = _on_first_sampler_step(edit_the_queue)
    ids["running"] = comfy_client.queue_prompt(running)
    messages = comfy_client.wait_for_prompt(ids["running"], timeout=300, on_message=hook)
    assert edited == [True], _types(messages)
    assert states["after_delete"] == ([ids["running"]], [ids["cleared"]]), (states, ids)
    assert states["after_clear"] == ([ids["running"]], []), (states, ids)
    assert _succeeded(messages) and _sampled_in_full(messages), _types(messages)
    assert len(comfy_client.output_images(ids["running"])) == 1

    # Queued again, the cleared edit runs; had either taken-off prompt stayed queued, it would have run first.
    again_id, again = comfy_client.run_prompt(cleared, timeout=300)
    assert _succeeded(again) and _sampled_in_full(again), _types(again)
    assert len(comfy_client.output_images(again_id)) == 1
    assert comfy_client.history(ids["deleted"]) == {} and comfy_client.history(ids["cleared"]) == {}
    assert comfy_client.queue() == ([], [])

"""The real ComfyUI frontend in headless Debian chromium, driven by Python playwright.

It proves what only a browser can: the shipped workflows load with no missing-node dialog, the frontend's
own graphToPrompt() agrees with our ui_to_api() (which every headless workflow test relies on), and a
workflow queued from the page produces an image the page shows. Screenshots go to
test-artifacts/screenshots/. Never `playwright install`: the system chromium is used.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

import harness
import workflow_format

pytestmark = [pytest.mark.comfy, pytest.mark.server, pytest.mark.browser]

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DIALOG_TEXTS = "() => [...document.querySelectorAll('.p-dialog')].map(d => d.innerText)"


def _chromium_path() -> str | None:
    return os.environ.get("BLENDED_CHROMIUM") or shutil.which("chromium") or \
        (shutil.which("chromium-browser"))


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: browser tests must run, not skip)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def screenshots(artifacts_dir) -> Path:
    path = artifacts_dir / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    executable = _chromium_path()
    if executable is None:
        _unavailable("no chromium executable (scripts/setup_env.sh --test installs Debian's)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (requirements-test.txt)")
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        yield instance
        instance.close()


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return harness.ComfyClient(comfy_server.base_url).object_info()


VUE_NODES = "Comfy.VueNodes.Enabled"  # the user setting behind the frontend's "Nodes 2.0" (Vue-rendered nodes)
NODES_2_0 = pytest.param(True, id="nodes_2_0")
CANVAS_AND_NODES_2_0 = [pytest.param(False, id="litegraph"), NODES_2_0]


@pytest.fixture
def page(request, browser, comfy_server, comfy_client):
    """A fresh page on the canvas with the first-run Templates dialog already out of the way; with Nodes 2.0 on
    where the test parametrizes it indirectly as True (the setting is written back to off after the page)."""
    vue_nodes = getattr(request, "param", False)
    for setting, value in (("Comfy.TutorialCompleted", True), (VUE_NODES, vue_nodes)):
        status, _ = comfy_client.post_json(f"/settings/{setting}", value)
        assert status == 200
    if vue_nodes:
        request.addfinalizer(lambda: comfy_client.post_json(f"/settings/{VUE_NODES}", False))
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(comfy_server.base_url, wait_until="domcontentloaded", timeout=120_000)
    page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph && "
                           "Object.keys(window.LiteGraph.registered_node_types).length > 50", timeout=120_000)
    _close_dialogs(page)
    assert page.evaluate(f"() => window.app.extensionManager.setting.get('{VUE_NODES}')") is vue_nodes
    page.page_errors, page.vue_nodes = errors, vue_nodes
    yield page
    context.close()


def _close_dialogs(page) -> None:
    for _ in range(3):
        if not page.evaluate(DIALOG_TEXTS):
            return
        page.keyboard.press("Escape")
        time.sleep(0.3)


def _load_graph(page, workflow: dict) -> list[str]:
    """Load a UI workflow onto the canvas; return the texts of dialogs it opened."""
    _close_dialogs(page)
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
    time.sleep(0.5)
    return page.evaluate(DIALOG_TEXTS)


def _frontend_prompt(page) -> dict:
    return page.evaluate("async () => (await window.app.graphToPrompt()).output")


# Under Nodes 2.0 each node of the graph is a DOM element; each widget's control is labelled with the widget's name,
# and an output node shows its images as <img> elements fetched from /view.
VUE_NODE_IDS = "() => [...document.querySelectorAll('[data-node-id]')].map(e => Number(e.dataset.nodeId))"
VUE_WIDGET_VALUES = """(id) => Object.fromEntries([...document.querySelector(`[data-node-id="${id}"]`)
  .querySelectorAll('input[aria-label], textarea[aria-label], [role="combobox"][aria-label]')].map(c =>
  [c.getAttribute('aria-label'), c.type === 'checkbox' ? c.checked : c.matches('[role="combobox"]') ? c.innerText
                                                                    : c.value]))"""
VUE_IMAGE_SHOWN = """([id, file]) => [...document.querySelectorAll(`[data-node-id="${id}"] img`)]
  .some(img => img.complete && img.naturalWidth > 0 && new URL(img.src).searchParams.get('filename') === file)"""


def _shown_on_vue_widgets(page, node_id: int, values: dict) -> dict:
    """The subset of `values` (name -> value) that a Nodes 2.0 node does not show on its widget of that name, as
    {name: (value, shown)}: numbers as their numeric text, booleans as switches, strings as text or menu label."""
    shown = page.evaluate(VUE_WIDGET_VALUES, node_id)

    def same(value, text):
        if isinstance(value, bool) or isinstance(text, bool):
            return value is text
        if isinstance(value, int | float):
            try:
                return float(text.replace(",", "")) == value
            except (AttributeError, ValueError):
                return False
        return text == value

    return {name: (value, shown.get(name)) for name, value in values.items() if not same(value, shown.get(name))}


def _core_workflow() -> dict:
    return {
        "last_node_id": 3, "last_link_id": 2, "version": 0.4, "groups": [], "config": {}, "extra": {},
        "nodes": [
            {"id": 1, "type": "LoadImage", "pos": [0, 0], "size": [300, 320], "flags": {}, "order": 0, "mode": 0,
             "inputs": [], "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]},
                                       {"name": "MASK", "type": "MASK", "links": None}],
             "properties": {}, "widgets_values": ["blended_example_img.png", "image"]},
            {"id": 2, "type": "ImageInvert", "pos": [350, 0], "size": [200, 50], "flags": {}, "order": 1,
             "mode": 0, "inputs": [{"name": "image", "type": "IMAGE", "link": 1}],
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [2]}], "properties": {}},
            {"id": 3, "type": "SaveImage", "pos": [600, 0], "size": [300, 320], "flags": {}, "order": 2,
             "mode": 0, "inputs": [{"name": "images", "type": "IMAGE", "link": 2}], "outputs": [],
             "properties": {}, "widgets_values": ["browser_core"]},
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"]],
    }


def _tricky_core_workflow() -> dict:
    """Bypass, mute, reroute, a PrimitiveNode-fed widget and seed control: each a ui_to_api special case."""
    def node(node_id, type_, order, inputs=(), outputs=(), widgets=None, mode=0):
        entry = {"id": node_id, "type": type_, "pos": [300 * order, 0], "size": [260, 200], "flags": {},
                 "order": order, "mode": mode, "inputs": list(inputs), "outputs": list(outputs), "properties": {}}
        if widgets is not None:
            entry["widgets_values"] = widgets
        return entry

    image_out = {"name": "IMAGE", "type": "IMAGE"}
    return {
        "last_node_id": 8, "last_link_id": 6, "version": 0.4, "groups": [], "config": {}, "extra": {},
        "nodes": [
            node(1, "LoadImage", 0, outputs=[image_out | {"links": [1, 4]}, {"name": "MASK", "type": "MASK",
                                                                              "links": None}],
                 widgets=["blended_example_img2.png", "image"]),
            node(2, "ImageInvert", 1, [{"name": "image", "type": "IMAGE", "link": 1}],
                 [image_out | {"links": [2]}], mode=workflow_format.MODE_BYPASSED),
            node(3, "Reroute", 2, [{"name": "", "type": "*", "link": 2}],
                 [{"name": "", "type": "IMAGE", "links": [3]}]),
            node(4, "SaveImage", 3, [{"name": "images", "type": "IMAGE", "link": 3}], widgets=["tricky"]),
            node(5, "ImageInvert", 1, [{"name": "image", "type": "IMAGE", "link": 4}],
                 [image_out | {"links": [5]}], mode=workflow_format.MODE_MUTED),
            node(6, "PreviewImage", 2, [{"name": "images", "type": "IMAGE", "link": 5}]),
            node(7, "KSampler", 4, [{"name": "model", "type": "MODEL", "link": None},
                                    {"name": "positive", "type": "CONDITIONING", "link": None},
                                    {"name": "negative", "type": "CONDITIONING", "link": None},
                                    {"name": "latent_image", "type": "LATENT", "link": None},
                                    {"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": 6}],
                 [{"name": "LATENT", "type": "LATENT", "links": None}],
                 widgets=[123456789, "fixed", 7, 6.5, "euler", "karras", 0.75]),
            node(8, "PrimitiveNode", 0, outputs=[{"name": "INT", "type": "INT", "links": [6],
                                                   "widget": {"name": "steps"}}], widgets=[7, "fixed"]),
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 0, 4, 0, "IMAGE"],
                  [4, 1, 0, 5, 0, "IMAGE"], [5, 5, 0, 6, 0, "IMAGE"], [6, 8, 0, 7, 4, "INT"]],
    }


def test_ui_to_api_matches_the_frontend_on_special_cases(page, object_info, screenshots):
    workflow = _tricky_core_workflow()
    assert _load_graph(page, workflow) == []
    page.screenshot(path=str(screenshots / "tricky_core_workflow.png"))
    frontend = _comparable(_frontend_prompt(page), object_info)
    ours = _comparable(workflow_format.ui_to_api(workflow, object_info), object_info)
    assert ours == frontend, json.dumps({"ours": ours, "frontend": frontend}, indent=1)
    assert ours["4"]["inputs"]["images"] == ["1", 0]  # the case really exercised bypass + reroute


def _queue_and_wait_for_image(page, comfy_client, output_node_ids, timeout=300) -> dict:
    """Queue the canvas as the Run button does; wait until history has it and the page shows its image."""
    before = set(comfy_client.get_json("/history"))
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    deadline = time.monotonic() + timeout
    entry = None
    while time.monotonic() < deadline:
        new = {pid: h for pid, h in comfy_client.get_json("/history").items() if pid not in before}
        if new:
            entry = next(iter(new.values()))
            if entry.get("status", {}).get("completed") or entry.get("status", {}).get("status_str") == "error":
                break
        time.sleep(1)
    assert entry is not None, "the page queued nothing"
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    shown = "(ids) => ids.some(id => { const n = window.app.graph.getNodeById(Number(id)); " \
            "const out = window.app.nodeOutputs && window.app.nodeOutputs[String(id)]; " \
            "return (n && n.imgs && n.imgs.length > 0) || (out && out.images && out.images.length > 0); })"
    page.wait_for_function(shown, arg=[str(i) for i in output_node_ids], timeout=60_000)
    return entry


def test_canvas_opens_without_dialogs_or_page_errors(page, screenshots):
    page.screenshot(path=str(screenshots / "canvas.png"))
    assert page.evaluate(DIALOG_TEXTS) == []
    assert page.page_errors == []


def test_frontend_registers_every_pack_node(page, object_info):
    registered = set(page.evaluate("() => Object.keys(window.LiteGraph.registered_node_types)"))
    ours = {name for name in object_info if name.startswith("BlendedDiffusion_")}
    assert ours, "the server lists none of the pack's nodes"
    assert ours <= registered, sorted(ours - registered)


def test_core_workflow_queued_from_the_page_shows_its_image(page, comfy_client, object_info, screenshots):
    workflow = _core_workflow()
    assert _load_graph(page, workflow) == []
    ours = workflow_format.ui_to_api(workflow, object_info)
    assert _comparable(_frontend_prompt(page), object_info) == _comparable(ours, object_info)
    entry = _queue_and_wait_for_image(page, comfy_client, ["3"])
    assert entry["outputs"]["3"]["images"]
    page.screenshot(path=str(screenshots / "core_workflow_done.png"))


def _declared_models(workflow: dict) -> list[dict]:
    return [model for node in workflow["nodes"] for model in node.get("properties", {}).get("models", [])]


def test_a_workflow_opened_without_its_models_says_what_to_get_and_where(page):
    """Each shipped loader declares its file (name, official URL, folder) as the frontend reads it."""
    from blended.model_files import MODEL_FILES

    workflow = harness.load_workflow(harness.workflow_files()[0])
    declared = {m["name"]: m for m in _declared_models(workflow)}
    official = {m.name: m.declaration() for m in MODEL_FILES if m.required}
    assert declared == official
    text = "\n".join(_load_graph(page, workflow))
    for model in official.values():
        assert f"{model['directory']} / {model['name']}" in text
    assert official["256x256_diffusion_uncond.pt"]["url"] in text  # shown where the panel cannot download it


def _comparable(prompt: dict, object_info: dict) -> dict:
    """Class and inputs only; inputs the node does not declare (frontend-only display widgets such as
    PreviewAny's `preview`) are dropped, since the server ignores them."""
    def declared(class_type):
        spec = object_info.get(class_type, {}).get("input", {})
        return set(spec.get("required", {})) | set(spec.get("optional", {}))

    return {node_id: {"class_type": entry["class_type"],
                      "inputs": {k: v for k, v in entry["inputs"].items() if k in declared(entry["class_type"])}}
            for node_id, entry in prompt.items()}


@pytest.mark.parametrize("path", harness.workflow_files(), ids=lambda p: p.name)
def test_shipped_workflow_loads_and_matches_our_conversion(path, page, object_info, screenshots):
    workflow = harness.load_workflow(path)
    registered = set(page.evaluate("() => Object.keys(window.LiteGraph.registered_node_types)"))
    missing = workflow_format.node_types_used(workflow) - registered
    assert not missing, f"{path.name}: node types the frontend does not know: {sorted(missing)}"

    dialogs = _load_graph(page, workflow)
    page.screenshot(path=str(screenshots / f"{path.stem}.png"))
    # The test models folder holds only the tiny models: the one dialog is the frontend's missing-models
    # panel, naming each model the workflow declares with the folder it goes in (no missing nodes).
    declared = _declared_models(workflow)
    assert declared, f"{path.name}: its loaders declare no models (properties.models)"
    assert len(dialogs) == 1 and dialogs[0].startswith("Missing Models"), dialogs
    for model in declared:
        assert f"{model['directory']} / {model['name']}" in dialogs[0], (model, dialogs)
    assert page.page_errors == []

    frontend = _comparable(_frontend_prompt(page), object_info)
    ours = _comparable(workflow_format.ui_to_api(workflow, object_info), object_info)
    assert ours == frontend, json.dumps({"ours": ours, "frontend": frontend}, indent=1, default=str)[:6000]


@pytest.mark.parametrize("page", [NODES_2_0], indirect=True)
def test_shipped_workflows_under_nodes_2_0_show_every_node_with_its_values(page, object_info, screenshots):
    """With the frontend's Nodes 2.0 on, each shipped workflow opens without a missing-node dialog or page error,
    every node is drawn as a Vue node, the pack's nodes show their saved values on widgets of the same name, and
    graphToPrompt() still gives what our conversion gives (as with the canvas renderer, above). A Sampler widget
    hovered shows its declared tooltip, as core nodes' widgets do."""
    for path in harness.workflow_files():
        workflow = harness.load_workflow(path)
        dialogs = _load_graph(page, workflow)
        assert all(d.startswith("Missing Models") for d in dialogs), (path.name, dialogs)
        _close_dialogs(page)
        page.screenshot(path=str(screenshots / f"{path.stem}_nodes_2_0.png"))
        assert sorted(page.evaluate(VUE_NODE_IDS)) == sorted(n["id"] for n in workflow["nodes"]), path.name
        for node in workflow["nodes"]:
            if node["type"].startswith("BlendedDiffusion_"):
                saved = workflow_format.widget_values_by_name(node, object_info[node["type"]])
                assert saved and _shown_on_vue_widgets(page, node["id"], saved) == {}, (path.name, node["type"])
        frontend = _comparable(_frontend_prompt(page), object_info)
        ours = _comparable(workflow_format.ui_to_api(workflow, object_info), object_info)
        assert ours == frontend, (path.name, json.dumps({"ours": ours, "frontend": frontend}, default=str)[:6000])
    sampler = next(n["id"] for n in workflow["nodes"] if n["type"] == harness.SAMPLER)
    page.evaluate("(id) => window.app.canvas.centerOnNode(window.app.graph.getNodeById(id))", sampler)
    page.locator(f'[data-node-id="{sampler}"] [aria-label="skip_timesteps"]').hover()
    page.wait_for_selector(".p-tooltip", timeout=10_000)
    tooltip = object_info[harness.SAMPLER]["input"]["required"]["skip_timesteps"][1]["tooltip"]
    assert page.evaluate("() => [...document.querySelectorAll('.p-tooltip')].map(t => t.innerText)") == [tooltip]
    page.screenshot(path=str(screenshots / "sampler_tooltip_nodes_2_0.png"))
    assert page.page_errors == []


# Every node's box on the canvas as the frontend has laid it out after loading: its body (pos, size, which
# the frontend grows to fit the node's widgets) and its title bar above pos. Groups are not nodes.
NODE_BOXES = """() => { const title = window.LiteGraph.NODE_TITLE_HEIGHT;
  return window.app.graph._nodes.map(n => ({id: n.id, title: n.title,
    box: [n.pos[0], n.pos[1] - title, n.size[0], n.size[1] + title]})); }"""
# Under Nodes 2.0 a node is a DOM element that sizes itself to its content: its box on the screen.
VUE_NODE_BOXES = """() => [...document.querySelectorAll('[data-node-id]')].map(e => {
  const r = e.getBoundingClientRect();
  return {id: Number(e.dataset.nodeId), title: e.querySelector('[data-testid="node-title"]')?.innerText ?? '',
          box: [r.x, r.y, r.width, r.height]}; })"""


def _overlaps(nodes: list[dict]) -> list[str]:
    found = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            (ax, ay, aw, ah), (bx, by, bw, bh) = a["box"], b["box"]
            dx, dy = min(ax + aw, bx + bw) - max(ax, bx), min(ay + ah, by + bh) - max(ay, by)
            if dx > 0 and dy > 0:
                found.append(f"#{a['id']} {a['title']!r} and #{b['id']} {b['title']!r} overlap by {dx:g} x {dy:g}")
    return found


@pytest.mark.parametrize("page", CANVAS_AND_NODES_2_0, indirect=True)
def test_shipped_workflows_open_with_no_node_covering_another(page):
    """After the frontend has grown each node to fit its widgets (under Nodes 2.0: to fit its content, with the
    layout spread out by the frontend), no node (title bar included) covers part of another, so every widget of
    every shipped workflow can be seen and reached."""
    overlaps = {}
    for path in harness.workflow_files():
        _load_graph(page, harness.load_workflow(path))
        if page.vue_nodes:
            time.sleep(1)  # the image previews load and the nodes grow around them
        found = _overlaps(page.evaluate(VUE_NODE_BOXES if page.vue_nodes else NODE_BOXES))
        if found:
            overlaps[path.name] = found
    assert page.page_errors == []
    assert not overlaps, json.dumps(overlaps, indent=1)


@pytest.mark.slow
@pytest.mark.parametrize("page", CANVAS_AND_NODES_2_0, indirect=True)
def test_a_shipped_workflow_queued_from_the_page_produces_images(page, comfy_client, object_info, screenshots):
    candidates = [p for p in harness.workflow_files()
                  if harness.SAMPLER in workflow_format.node_types_used(harness.load_workflow(p))]
    assert candidates, "no shipped workflow uses the sampler"
    workflow = harness.shrink_ui_workflow(harness.load_workflow(candidates[0]), object_info)
    assert _load_graph(page, workflow) == []
    prompt = workflow_format.ui_to_api(workflow, object_info)
    outputs = [nid for nid, e in prompt.items() if object_info[e["class_type"]].get("output_node")]
    entry = _queue_and_wait_for_image(page, comfy_client, outputs)
    images = [image for output in entry["outputs"].values() for image in output.get("images", [])]
    assert images
    for image in images:
        assert comfy_client.view(image)[:8] == b"\x89PNG\r\n\x1a\n"
    shown = {int(node_id): output["images"][0]["filename"] for node_id, output in entry["outputs"].items()
             if output.get("images")}
    for node_id, filename in shown.items() if page.vue_nodes else ():  # each Vue node shows its first image
        page.wait_for_function(VUE_IMAGE_SHOWN, arg=[node_id, filename], timeout=30_000)
    page.evaluate("(id) => window.app.canvas.centerOnNode(window.app.graph.getNodeById(id))", min(shown))
    time.sleep(0.5)
    page.screenshot(path=str(screenshots / f"{candidates[0].stem}_done{'_nodes_2_0' * page.vue_nodes}.png"))


# Widget names of the layouts that web/blended_diffusion.js upgrades, in their saved order (written out here,
# independently of the extension, from the pack's earlier INPUT_TYPES), with a workflow saved in each.
_SAMPLER_FIRST = ["seed", None, "num_results", "respacing", "skip_timesteps", "method", "mode",
                  "enforce_background", "invert_mask", "batch_size", "region", "context", "grow_mask", "feather"]
_OLD_LOADER = ["model_name", "dtype", "attention_order", "head_channels", "gradient_checkpointing"]
OLD_LAYOUT_WORKFLOWS = {
    "workflows_v1/01_ranked_results.json": {
        "BlendedDiffusion_Sampler": _SAMPLER_FIRST + ["background_noise_step", "reuse_guided_forward",
                                                      "capture_every", "ddim_eta", "precision", "channels_last",
                                                      "compile", "preview"],
        "BlendedDiffusion_LoadGuidedDiffusion": _OLD_LOADER},
    "old_layouts/sampler_19_widgets.json": {
        "BlendedDiffusion_Sampler": _SAMPLER_FIRST + ["background_noise_step", "reuse_guided_forward",
                                                      "capture_every", "ddim_eta", "preview"],
        "BlendedDiffusion_LoadGuidedDiffusion": _OLD_LOADER},
    "old_layouts/sampler_18_widgets.json": {
        "BlendedDiffusion_Sampler": _SAMPLER_FIRST + ["background_noise_step", "capture_every", "ddim_eta",
                                                      "preview"]},
    "old_layouts/sampler_26_widgets.json": {
        "BlendedDiffusion_Sampler": _SAMPLER_FIRST + ["resample_count", "resample_jump_length", "soft_mask",
                                                      "colour_match", "background_noise_step",
                                                      "reuse_guided_forward", "capture_every", "ddim_eta",
                                                      "precision", "channels_last", "compile", "preview"],
        "BlendedDiffusion_LoadGuidedDiffusion": _OLD_LOADER},
}


@pytest.mark.parametrize("page", CANVAS_AND_NODES_2_0, indirect=True)
@pytest.mark.parametrize("fixture", OLD_LAYOUT_WORKFLOWS)
def test_a_workflow_saved_with_an_earlier_widget_layout_opens_with_its_values(fixture, page, object_info):
    """Widgets left the Sampler and the loader, others were added in the middle: an old workflow still gets
    every remaining value on the widget of the same name (not shifted by position), widgets added since get
    their defaults, and the frontend queues what it saved; under Nodes 2.0 the node's widgets show them too."""
    layouts = OLD_LAYOUT_WORKFLOWS[fixture]
    workflow = json.loads((harness.FIXTURES / fixture).read_text())
    saved = {n["id"]: n for n in workflow["nodes"] if n["type"] in layouts}
    assert {n["type"] for n in saved.values()} == set(layouts)
    assert all(not d.startswith(("Missing Node", "Some Nodes")) for d in _load_graph(page, workflow))
    assert page.page_errors == []
    prompt = _frontend_prompt(page)
    for node_id, node in saved.items():
        declared = object_info[node["type"]]["input"]
        current = set(declared["required"]) | set(declared.get("optional", {}))
        saved_values = zip(layouts[node["type"]], node["widgets_values"], strict=True)
        expected = {name: value for name, value in saved_values if name in current}
        for name in current - set(layouts[node["type"]]):  # widgets added since: their declared defaults
            spec = declared["required"].get(name) or declared["optional"][name]
            if isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                expected[name] = spec[1]["default"] if "default" in spec[1] else spec[0][0]
        got = {k: v for k, v in prompt[str(node_id)]["inputs"].items() if not isinstance(v, list)}
        assert got == expected, (node["type"], got, expected)
        if page.vue_nodes:
            assert _shown_on_vue_widgets(page, node_id, expected) == {}, node["type"]


def _widget_value(page, node_id: int, name: str):
    return page.evaluate("([id, name]) => window.app.graph.getNodeById(id).widgets.find(w => w.name === name).value",
                         [node_id, name])


# nodes/rank.py reads the former `normalized` switch saved in `mode`'s slot as these modes.
@pytest.mark.parametrize(("saved", "mode"), [(True, "guidance view"), (False, "original"), ("true", "guidance view")])
def test_a_clip_rank_saved_with_the_normalized_switch_shows_the_mode_it_runs(saved, mode, page):
    workflow = json.loads((harness.FIXTURES / "workflows_v1/01_ranked_results.json").read_text())
    rank = next(n for n in workflow["nodes"] if n["type"] == "BlendedDiffusion_CLIPRank")
    rank["widgets_values"][2] = saved
    _load_graph(page, workflow)
    assert page.page_errors == []
    assert _widget_value(page, rank["id"], "mode") == mode
    assert _frontend_prompt(page)[str(rank["id"])]["inputs"]["mode"] == mode


TOAST_TEXTS = "() => [...document.querySelectorAll('.p-toast-message')].map(t => t.innerText)"


@pytest.mark.parametrize("page", CANVAS_AND_NODES_2_0, indirect=True)
def test_settings_dropped_from_an_earlier_layout_are_named_with_what_to_use_instead(page):
    """Values of widgets that moved to the Speed node are reported in the console and in a toast, each with
    its setting on the Speed node (the loader's float16 UNet was the Speed node's "fp16 torso")."""
    workflow = json.loads((harness.FIXTURES / "old_layouts/sampler_26_widgets.json").read_text())
    nodes = {n["type"]: n for n in workflow["nodes"]}
    nodes["BlendedDiffusion_LoadGuidedDiffusion"]["widgets_values"][1] = "float16"
    nodes["BlendedDiffusion_Sampler"]["widgets_values"][24] = True  # compile
    warnings: list[str] = []
    page.on("console", lambda message: message.type == "warning" and warnings.append(message.text))
    _load_graph(page, workflow)
    deadline = time.monotonic() + 5
    while len(toasts := page.evaluate(TOAST_TEXTS)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    for texts in (warnings, toasts):
        loader = [t for t in texts if "dtype=float16" in t]
        assert len(loader) == 1 and 'precision "fp16 torso"' in loader[0], texts
        sampler = [t for t in texts if "compile=true" in t]
        assert len(sampler) == 1 and "Speed node" in sampler[0], texts
    assert all("Blended Diffusion" in t for t in toasts), toasts
    assert page.page_errors == []


@pytest.mark.parametrize("page", CANVAS_AND_NODES_2_0, indirect=True)
def test_an_earlier_layout_inside_a_subgraph_opens_with_its_values_and_names_its_subgraph(page, object_info):
    """The same migration for pack nodes inside a subgraph definition (saved by "Convert to Subgraph"): the values
    land on the widgets of the same name, and a dropped setting's notice says which subgraph its node id is in
    (a top-level node may have the same id)."""
    workflow = json.loads((harness.FIXTURES / "old_layouts/sampler_26_widgets_in_subgraph.json").read_text())
    definition = workflow["definitions"]["subgraphs"][0]
    instance = next(n for n in workflow["nodes"] if n["type"] == definition["id"])
    inner = {n["type"]: n for n in definition["nodes"]}
    inner["BlendedDiffusion_LoadGuidedDiffusion"]["widgets_values"][1] = "float16"
    sampler = inner["BlendedDiffusion_Sampler"]
    layout = OLD_LAYOUT_WORKFLOWS["old_layouts/sampler_26_widgets.json"]["BlendedDiffusion_Sampler"]
    sampler["widgets_values"][layout.index("compile")] = True
    warnings: list[str] = []
    page.on("console", lambda message: message.type == "warning" and warnings.append(message.text))
    _load_graph(page, workflow)
    assert page.page_errors == []
    notices = [t for t in warnings if "Speed node" in t]
    assert len(notices) == 2 and all('in subgraph "Blended edit")' in t for t in notices), warnings
    assert any(f"(node {sampler['id']} in subgraph" in t and "compile=true" in t for t in notices), notices
    declared = object_info["BlendedDiffusion_Sampler"]["input"]
    current = set(declared["required"]) | set(declared.get("optional", {}))
    got = _frontend_prompt(page)[f"{instance['id']}:{sampler['id']}"]["inputs"]
    for name, value in zip(layout, sampler["widgets_values"], strict=True):
        if name in current:
            assert got[name] == value, name


# The help panel's input items, by name: [name · type, tooltip, default] as the panel shows their lines.
HELP_INPUTS = """() => [...document.querySelectorAll('.node-help-content h2')]
  .filter(h => ['Inputs', 'Optional inputs'].includes(h.innerText.trim()))
  .flatMap(h => [...h.nextElementSibling.querySelectorAll('li')].map(li => li.innerText.trim().split('\\n')))"""


@pytest.mark.parametrize("node_type, hand_written", [
    (harness.SAMPLER, "100 respaced steps with the first 25 skipped (75 run)"),
    ("BlendedDiffusion_CLIPGuidance", "With none of the optional inputs connected the loss is exactly the original's"),
])
def test_the_node_librarys_help_button_shows_the_nodes_help_page(node_type, hand_written, page, object_info,
                                                                   screenshots):
    """In the node library, a node's "?" button opens the help panel with the pack's page (web/docs/), not the
    frontend's fallback: its hand-written text, and each input's tooltip as declared (the Markdown's escapes undone:
    CLIP Guidance's prompt tooltip has bars, colons and backslashes), with its default on the line under it."""
    display_name = object_info[node_type]["display_name"]
    page.locator(".node-library-tab-button").click()
    page.locator(".node-lib-search-box input").fill(display_name)
    leaf = page.locator(".p-tree-node-content", has_text=display_name).first
    leaf.hover()
    leaf.locator(".help-button").click()
    page.wait_for_function("(text) => document.querySelector('.node-help-content')?.innerText.includes(text)",
                           arg=hand_written, timeout=30_000)
    assert page.locator(".node-help-content .fallback-content").count() == 0
    page.locator(".node-help-content h2", has_text="Inputs").first.scroll_into_view_if_needed()
    page.screenshot(path=str(screenshots / f"{node_type}_help_page_inputs.png"))
    shown = {lines[0].split(" · ")[0]: lines[1:] for lines in page.evaluate(HELP_INPUTS)}
    declared = object_info[node_type]["input"]
    tooltips = {name: spec[1]["tooltip"] for section in ("required", "optional")
                for name, spec in declared.get(section, {}).items()}
    assert sorted(shown) == sorted(tooltips)
    assert {name: shown[name][0] for name, tip in tooltips.items() if shown[name][0] != tip} == {}
    if node_type == harness.SAMPLER:
        assert shown["seed"][1] == f"Default: {declared['required']['seed'][1]['default']} (0 to {2**64 - 1})."
    assert page.page_errors == []

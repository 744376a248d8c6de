"""The nodes' help pages: `web/docs/<NODE_CLASS>.md`, which the frontend's node library shows as a node's help.

The frontend fetches a custom node's help from `/extensions/<pack folder>/docs/<NODE_CLASS>.md` (after a
`<NODE_CLASS>/<locale>.md` it does not find), and ComfyUI serves `/extensions/<pack folder>/` from the pack's
WEB_DIRECTORY. A page replaces the frontend's fallback (the description, inputs and outputs with their tooltips),
so the pages are generated from the live node definitions by `scripts/make_node_docs.py` and must be what it
writes now.
"""

from __future__ import annotations

import importlib.util

import pytest

import harness

DOCS = harness.REPO_ROOT / "web" / "docs"


def _generator():
    spec = importlib.util.spec_from_file_location("make_node_docs", harness.REPO_ROOT / "scripts" / "make_node_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _committed() -> dict[str, str]:
    return {path.stem: path.read_text(encoding="utf-8") for path in sorted(DOCS.glob("*.md"))}


@pytest.mark.comfy
def test_committed_node_docs_are_what_the_generator_writes(comfy_inprocess):
    """web/docs/*.md are generated from the live node definitions (inputs, outputs, tooltips, descriptions) and the
    shipped workflows; a change to any must regenerate them (`PYTHONPATH=. .venv/bin/python
    scripts/make_node_docs.py`), or the help panel would show stale tooltips."""
    module = _generator()
    expected = module.build_all(module.node_infos(comfy_inprocess), module.load_workflows())
    committed = _committed()
    assert sorted(committed) == sorted(expected)
    for name, text in expected.items():
        assert committed[name] == text, f"web/docs/{name}.md is stale: run scripts/make_node_docs.py"


@pytest.mark.comfy
def test_every_node_the_pack_registers_has_a_help_page_where_the_frontend_looks(comfy_inprocess):
    """One page per registered node and none for a node that is gone; and each node's python_module names the
    pack's folder, from which the frontend builds the help URL `/extensions/<folder>/docs/`."""
    registered = comfy_inprocess.pack_module("__init__").NODE_CLASS_MAPPINGS
    assert registered
    pages = set(_committed())
    assert sorted(set(registered) - pages) == [], "nodes without a help page"
    assert sorted(pages - set(registered)) == [], "help pages of nodes the pack does not register"
    for name, node_class in registered.items():
        assert node_class.RELATIVE_PYTHON_MODULE == f"custom_nodes.{harness.PACK_DIR_NAME}", name


@pytest.mark.comfy
@pytest.mark.server
def test_the_server_serves_the_help_pages_where_the_frontend_fetches_them(comfy_client):
    """Through the real server, at the URL the frontend builds from each node's /object_info python_module
    (`/extensions/<pack folder>/docs/<NODE_CLASS>.md`): status 200 and the page's text, the Sampler's first."""
    object_info = comfy_client.object_info()
    names = [harness.SAMPLER] + sorted(set(_committed()) - {harness.SAMPLER})
    for name in names:
        folder = object_info[name]["python_module"].split(".")[1].split("@")[0]  # as the frontend extracts it
        assert folder == harness.PACK_DIR_NAME, object_info[name]["python_module"]
        status, _, body = comfy_client.get_bytes(f"/extensions/{folder}/docs/{name}.md")
        assert status == 200, name
        assert body.decode("utf-8") == (DOCS / f"{name}.md").read_text(encoding="utf-8"), name

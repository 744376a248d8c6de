"""ComfyUI's workflow formats, as the frontend reads and writes them: pure Python, no ComfyUI import.

A UI-format workflow (what `workflows/*.json` hold and the frontend saves) stores each node's widget values
by position; the API prompt (what `/prompt` executes) names them. `widget_layout` knows the positions,
`ui_to_api` does the frontend's graphToPrompt conversion. `scripts/make_workflows.py` writes the shipped
workflows with them and the tests run those workflows headlessly with them; the browser test checks both
against the real frontend. The pack itself never imports this module.
"""

from __future__ import annotations

from typing import Any

# Frontend-only node types: they never reach the server (graphToPrompt drops or resolves through them).
VIRTUAL_NODE_TYPES = frozenset({"Reroute", "PrimitiveNode", "Note", "MarkdownNote"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
MODE_MUTED, MODE_BYPASSED = 2, 4
# The frontend gives these INT inputs a control_after_generate widget even without the option.
IMPLICIT_SEED_NAMES = frozenset({"seed", "noise_seed"})
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")


class WorkflowConversionError(ValueError):
    """A UI workflow cannot be turned into an API prompt (unknown node type, subgraph, bad link)."""


def node_info_v1(node_class: type) -> dict:
    """The `/object_info` entry ComfyUI's server would build for one node class (input part only matters)."""
    if hasattr(node_class, "GET_NODE_INFO_V1"):  # V3 io.ComfyNode
        return node_class.GET_NODE_INFO_V1()
    input_types = node_class.INPUT_TYPES()
    return {
        "input": input_types,
        "input_order": {key: list(value.keys()) for key, value in input_types.items()},
        "output": node_class.RETURN_TYPES,
        "description": getattr(node_class, "DESCRIPTION", ""),
        "category": getattr(node_class, "CATEGORY", "sd"),
    }


def input_options(spec: Any) -> dict:
    """The options dict of an input spec `[type, {options}]` (empty when the spec has none)."""
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_widget(spec: Any) -> bool:
    """Whether the frontend shows this input as a widget (a value) rather than a link slot."""
    if input_options(spec).get("forceInput"):
        return False
    return isinstance(spec[0], (list, tuple)) or spec[0] in WIDGET_TYPES


def widget_default(spec: Any) -> Any:
    """The value a freshly added node's widget starts with in the frontend."""
    type_, options = spec[0], input_options(spec)
    if "default" in options:
        return options["default"]
    if isinstance(type_, (list, tuple)):
        return type_[0] if type_ else None
    if type_ == "COMBO":
        return (options.get("options") or [None])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(type_)


def widget_layout(node_def: dict) -> list[tuple[str | None, dict]]:
    """Widget input names in the order the frontend stores their values, None for value-only extras.

    The extras are the control_after_generate combo that follows a seed and the upload button of
    LoadImage-like nodes: both occupy a slot in `widgets_values` but are not prompt inputs. The frontend
    adds the upload button as one more required input, so its slot comes after ALL required widgets
    (LoadImageMask stores [file, channel, "image"]), as checked against the real frontend in test_browser.
    """
    inputs = node_def.get("input", {})
    order = node_def.get("input_order") or {k: list(v.keys()) for k, v in inputs.items()}
    layout: list[tuple[str | None, dict]] = []
    for section in ("required", "optional"):
        uploads = 0
        for name in order.get(section, []):
            spec = inputs.get(section, {}).get(name)
            if spec is None or not is_widget(spec):
                continue
            options = input_options(spec)
            layout.append((name, spec))
            control = options.get("control_after_generate")
            if control is None and spec[0] == "INT":
                control = name in IMPLICIT_SEED_NAMES
            if control:
                layout.append((None, {"extra": "control_after_generate"}))
            if any(options.get(key) for key in UPLOAD_OPTIONS):
                uploads += 1
        layout.extend([(None, {"extra": "upload"})] * uploads)
    return layout


def widget_values_by_name(node: dict, node_def: dict) -> dict[str, Any]:
    """A UI-format node's widget values keyed by input name (value-only extras left out)."""
    values = node.get("widgets_values")
    if isinstance(values, dict):
        return dict(values)
    layout = widget_layout(node_def)
    return {name: value for (name, _spec), value in zip(layout, values or [], strict=False) if name}


def set_widget_value(node: dict, node_def: dict, name: str, value: Any) -> bool:
    """Change one widget of a UI-format node in place; False when the node has no such widget."""
    values = node.get("widgets_values")
    if isinstance(values, dict):
        if name in values:
            values[name] = value
            return True
        return False
    for index, (widget_name, _spec) in enumerate(widget_layout(node_def)):
        if widget_name == name and values is not None and index < len(values):
            values[index] = value
            return True
    return False


def fill_defaults(prompt: dict, node_defs: dict) -> dict:
    """Give every required widget a node's API prompt leaves out its default, as the frontend would."""
    for entry in prompt.values():
        required = node_defs[entry["class_type"]].get("input", {}).get("required", {})
        for name, spec in required.items():
            if name not in entry["inputs"] and is_widget(spec):
                entry["inputs"][name] = widget_default(spec)
    return prompt


def _links_by_id(workflow: dict) -> dict[int, tuple[int, int, int, int, Any]]:
    links = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):  # schema version 1 spells links as objects
            links[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                                 link.get("type"))
        else:
            links[link[0]] = (link[1], link[2], link[3], link[4], link[5] if len(link) > 5 else None)
    return links


def _same_type(a: Any, b: Any) -> bool:
    if a is None or b is None or a == "*" or b == "*":
        return True
    return bool(set(str(a).split(",")) & set(str(b).split(",")))


def ui_to_api(workflow: dict, node_defs: dict[str, dict]) -> dict[str, dict]:
    """Convert a UI-format (v0.4) workflow to the API prompt the frontend's graphToPrompt would queue.

    `node_defs` is `/object_info` (or `node_info_v1` of each class). Muted nodes are left out, bypassed
    nodes are wired through (an output takes the bypassed node's input of the same type), reroutes are
    followed, and widgets fed by a PrimitiveNode keep the value stored in the target's widgets_values.
    """
    if workflow.get("definitions", {}).get("subgraphs"):
        raise WorkflowConversionError("subgraphs are not supported by this converter")
    nodes = {node["id"]: node for node in workflow.get("nodes", [])}
    links = _links_by_id(workflow)

    def resolve(link_id: int, seen: frozenset = frozenset()) -> list | None:
        if link_id not in links:
            raise WorkflowConversionError(f"link {link_id} is referenced but not defined")
        origin_id, origin_slot, _, _, link_type = links[link_id]
        if origin_id in seen:
            raise WorkflowConversionError(f"link cycle through node {origin_id}")
        origin = nodes.get(origin_id)
        if origin is None:
            raise WorkflowConversionError(f"link {link_id} starts at missing node {origin_id}")
        mode = origin.get("mode", 0)
        if origin["type"] == "PrimitiveNode" or mode == MODE_MUTED:
            return None
        if origin["type"] == "Reroute" or mode == MODE_BYPASSED:
            candidates = origin.get("inputs") or []
            if origin["type"] == "Reroute":
                chosen = candidates[0] if candidates else None
            else:
                chosen = None
                if origin_slot < len(candidates) and _same_type(candidates[origin_slot].get("type"), link_type):
                    chosen = candidates[origin_slot]
                else:
                    chosen = next((c for c in candidates if _same_type(c.get("type"), link_type)), None)
            if chosen is None or chosen.get("link") is None:
                return None
            return resolve(chosen["link"], seen | {origin_id})
        return [str(origin_id), origin_slot]

    prompt: dict[str, dict] = {}
    for node in sorted(nodes.values(), key=lambda n: (n.get("order", 0), n["id"])):
        node_type = node["type"]
        if node_type in VIRTUAL_NODE_TYPES or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASSED):
            continue
        if node_type not in node_defs:
            raise WorkflowConversionError(f"node {node['id']} has type {node_type!r}, which ComfyUI does not know")
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values")
        if isinstance(values, dict):
            for name, _spec in widget_layout(node_defs[node_type]):
                if name is not None and name in values:
                    inputs[name] = values[name]
        elif values:
            for (name, _spec), value in zip(widget_layout(node_defs[node_type]), values, strict=False):
                if name is not None:
                    inputs[name] = value
        for slot in node.get("inputs") or []:
            if slot.get("link") is None:
                continue
            source = resolve(slot["link"])
            if source is not None:
                inputs[slot["name"]] = source
        entry = {"class_type": node_type, "inputs": inputs}
        title = node.get("title")
        if title:
            entry["_meta"] = {"title": title}
        prompt[str(node["id"])] = entry
    return prompt


def node_types_used(workflow: dict) -> set[str]:
    """Every real (server-side) node type a UI workflow needs."""
    return {n["type"] for n in workflow.get("nodes", []) if n["type"] not in VIRTUAL_NODE_TYPES}

"""The rules the pack's code keeps (docs/developing.md), checked on the source itself.

The library stays importable without ComfyUI, the pack logs instead of printing and leaves ``sys.path`` alone,
and the developer's map names every module there is and no path that is gone.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from harness import REPO_ROOT as REPO

# Module names ComfyUI puts on sys.path; none of them may be imported by the pure library. (``nodes`` is also
# ComfyUI's own module of core nodes; the library imports neither it nor the pack's adapters.)
COMFYUI_MODULES = {"comfy", "comfy_extras", "comfy_execution", "comfy_api", "comfy_config", "folder_paths",
                   "server", "execution", "nodes", "node_helpers", "latent_preview", "app", "utils", "main"}
# The pack's own code, as ComfyUI and its users run it: every rule below applies to it.
PACK_PYTHON = sorted([REPO / "__init__.py", REPO / "workflow_format.py", *(REPO / "blended").glob("*.py"),
                      *(REPO / "nodes").glob("*.py")])
SCRIPTS = sorted((REPO / "scripts").glob("*.py"))
DEVELOPING = REPO / "docs" / "developing.md"


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _imported_modules(tree: ast.Module) -> list[tuple[int, str]]:
    """Absolute imports anywhere in a module (inside functions too), as (line, top-level name)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def _calls_print(tree: ast.Module) -> list[int]:
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"]


def _touches_sys_path(tree: ast.Module) -> list[int]:
    """Lines that use ``sys.path`` at all (``sys.path.insert``, ``sys.path = ...``, ``from sys import path``): the
    pack has no reason even to read it, so any use is flagged rather than guessing which uses change it."""
    return sorted(node.lineno for node in ast.walk(tree)
                  if (isinstance(node, ast.Attribute) and node.attr == "path"
                      and isinstance(node.value, ast.Name) and node.value.id == "sys")
                  or (isinstance(node, ast.ImportFrom) and node.module == "sys"
                      and any(alias.name == "path" for alias in node.names)))


def _relative(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def test_the_rules_see_the_whole_pack():
    names = {_relative(p) for p in PACK_PYTHON}
    assert {"__init__.py", "blended/sampler.py", "nodes/sampler.py", "nodes/comfy_bridge.py"} <= names
    assert len([n for n in names if n.startswith("blended/")]) > 30


def test_the_library_imports_nothing_of_comfyui():
    offending = [f"{_relative(path)}:{line} imports {name}"
                 for path in sorted((REPO / "blended").glob("*.py"))
                 for line, name in _imported_modules(_tree(path)) if name in COMFYUI_MODULES]
    assert offending == [], "blended/ must run without ComfyUI: " + "; ".join(offending)


def test_the_import_check_would_see_a_comfyui_import_inside_a_function():
    tree = ast.parse("def load():\n    import comfy.model_management as mm\n    from folder_paths import x\n")
    assert [name for _, name in _imported_modules(tree) if name in COMFYUI_MODULES] == ["comfy", "folder_paths"]


def test_the_pack_logs_instead_of_printing():
    offending = [f"{_relative(path)}:{line}" for path in PACK_PYTHON for line in _calls_print(_tree(path))]
    assert offending == [], "use logging in the pack, not print(): " + ", ".join(offending)


def test_nothing_in_the_pack_or_its_scripts_changes_sys_path():
    offending = [f"{_relative(path)}:{line}" for path in PACK_PYTHON + SCRIPTS
                 for line in _touches_sys_path(_tree(path))]
    assert offending == [], "no sys.path changes (run scripts with PYTHONPATH=.): " + ", ".join(offending)
    assert _touches_sys_path(ast.parse("import sys\nsys.path.insert(0, 'x')\nfrom sys import path\n")) == [2, 3]


def _named_in_developing() -> str:
    return DEVELOPING.read_text(encoding="utf-8")


# Where docs/developing.md maps each folder: the text from the first marker to the second. A file is mapped when
# its name is in its folder's part (names like sampler.py are in both blended/ and nodes/).
MAP_SECTIONS = {
    "blended": ("The library, `blended/`", "The ComfyUI side, `nodes/`"),
    "nodes": ("The ComfyUI side, `nodes/`", "At the top:"),
    "scripts": ("Scripts, `scripts/`", "## The tests"),
    "tests": ("## The tests", "`tests/harness/` drives"),
    "tests/harness": ("`tests/harness/` drives", "## Checklists"),
}


def _map_section(folder: str) -> str:
    text = _named_in_developing()
    start, end = MAP_SECTIONS[folder]
    assert start in text and end in text, f"docs/developing.md lost its '{start}' or '{end}'"
    return text[text.index(start):text.index(end)]


@pytest.mark.parametrize("folder,pattern", [("blended", "*.py"), ("nodes", "*.py"), ("scripts", "*"),
                                            ("tests", "test_*.py"), ("tests/harness", "[!_]*.py")])
def test_the_developers_map_names_every_module(folder, pattern):
    section = _map_section(folder)
    files = sorted(p.name for p in (REPO / folder).glob(pattern) if p.is_file())
    assert files, folder
    missing = [name for name in files if f"`{name}`" not in section and f"`{folder}/{name}`" not in section]
    assert missing == [], f"docs/developing.md does not say where these {folder}/ files fit: {missing}"


def test_every_path_the_developers_map_names_exists():
    text = _named_in_developing()
    named = set(re.findall(r"`((?:blended|nodes|scripts|tests|web|docs|benchmarks|workflows)/[^`\s]*)`", text))
    named |= {m for m in re.findall(r"\]\(\.\./([^)#\s]+)\)", text)}
    assert len(named) > 10
    gone = sorted(p for p in named if not (REPO / p).exists())
    assert gone == [], f"docs/developing.md names paths that do not exist: {gone}"


def test_the_developers_maps_module_names_are_real_files():
    """A bare `name.py` in the map must be a file of the pack, so a renamed module is not left behind in it."""
    text = _named_in_developing()
    known = {p.name for folder in ("blended", "nodes", "scripts", "tests", "tests/harness")
             for p in (REPO / folder).iterdir() if p.is_file()} | {"__init__.py", "workflow_format.py"}
    known.add("main.py")  # ComfyUI's own entry script, which the server tests start
    unknown = sorted(set(re.findall(r"`([a-z_0-9]+\.(?:py|sh))`", text)) - known)
    assert unknown == [], f"docs/developing.md names files the pack does not have: {unknown}"

"""Model folders of the pack, registered the way ComfyUI's own folders are.

Assigning ``folder_names_and_paths`` directly (rather than ``add_model_folder_path`` alone, which gives an
unknown folder an empty extension set) keeps paths a user's ``extra_model_paths.yaml`` added before custom
nodes were imported, and lists only model files.
"""

import os

import folder_paths

from ..blended.checkpoint import find_config_file
from ..blended.model_files import CLIP_GUIDANCE_FOLDER, GUIDED_DIFFUSION_FOLDER

__all__ = ["CLIP_GUIDANCE_FOLDER", "GUIDED_DIFFUSION_FOLDER", "checkpoint_stamp", "find_model_file",
           "missing_model_message", "model_file_list", "model_file_path", "register_model_folders"]


def register_model_folders() -> None:
    for name in (GUIDED_DIFFUSION_FOLDER, CLIP_GUIDANCE_FOLDER):
        default = os.path.join(folder_paths.models_dir, name)
        if name in folder_paths.folder_names_and_paths:
            paths, _ = folder_paths.folder_names_and_paths[name]
            paths = list(paths)
            if default not in paths:
                paths.append(default)
        else:
            paths = [default]
        folder_paths.folder_names_and_paths[name] = (paths, set(folder_paths.supported_pt_extensions))


def model_file_list(name: str) -> list:
    files = folder_paths.get_filename_list(name)
    return sorted(files)


def _spellings(filename) -> list[str]:
    """``filename`` as selected, then with Windows' separators as "/": a workflow saved on Windows names a file in a
    subfolder "sub\\name.pt", which is "sub/name.pt" here (and Windows takes "/" as well)."""
    filename = str(filename)
    return [filename] + ([filename.replace("\\", "/")] if "\\" in filename and os.sep == "/" else [])


def find_model_file(name: str, filename) -> str | None:
    """The full path of a model file in the ``name`` folders, as ComfyUI finds it; None when it is not a file."""
    for spelling in _spellings(filename):
        path = folder_paths.get_full_path(name, spelling)
        if path is not None and os.path.isfile(path):
            return path
    return None


def _not_a_file_reason(name: str, filename) -> str | None:
    """Why a name that is in a ``name`` folder is no model file: a link to nothing, or a folder."""
    for folder in folder_paths.get_folder_paths(name):
        for spelling in _spellings(filename):
            try:
                relative = os.path.relpath(os.path.join("/", spelling), "/")
            except ValueError:  # on Windows, a name on another drive ("D:\\x.pt") has no path relative to "/"
                continue
            if relative == os.curdir:  # an empty name is the folder itself
                continue
            candidate = os.path.join(folder, relative)
            if os.path.islink(candidate) and not os.path.exists(candidate):
                return (f"model file {str(filename)!r} is a link to {os.readlink(candidate)!r}, which does not exist "
                        f"({candidate}). Connect the drive or folder it points to, or replace the link with the file, "
                        "then press R to refresh the list.")
            if os.path.isdir(candidate):
                return (f"{str(filename)!r} in the {name} folder is a folder ({candidate}), not a model file: select "
                        "the checkpoint file inside it (listed as its folder/name), or put the file itself there.")
    return None


def missing_model_message(name: str, filename) -> str | None:
    """What to tell a user whose model file is not in the ``name`` folder; None when it is there."""
    if find_model_file(name, filename) is not None:
        return None
    reason = _not_a_file_reason(name, filename)
    if reason is not None:
        return reason
    folders = ", ".join(folder_paths.get_folder_paths(name)) or f"models/{name}"
    return (f"model file {str(filename)!r} was not found in the {name} folder ({folders}). "
            "Put the file there and press R to refresh the list. To fetch the released ones, run "
            "'PYTHONPATH=. python scripts/download_models.py --comfyui <your ComfyUI folder>' in the pack's folder "
            "(README, 'Models').")


def model_file_path(name: str, filename: str) -> str:
    path = find_model_file(name, filename)
    if path is None:
        raise FileNotFoundError(missing_model_message(name, filename))
    return path


def checkpoint_stamp(name: str, filename: str) -> str:
    """Path, size and modification time of a model file and of the config.json its loader reads beside it.

    "" when the file is missing: the load itself says so.
    """
    path = find_model_file(name, filename)
    if path is None:
        return ""
    stamps = []
    for file in (path, find_config_file(path)):
        if file is not None and os.path.isfile(file):
            status = os.stat(file)
            stamps.append(f"{file}:{status.st_size}:{status.st_mtime_ns}")
    return " ".join(stamps)

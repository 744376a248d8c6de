"""Model folders of the pack, registered the way ComfyUI's own folders are.

Assigning ``folder_names_and_paths`` directly (rather than ``add_model_folder_path`` alone, which gives an
unknown folder an empty extension set) keeps paths a user's ``extra_model_paths.yaml`` added before custom
nodes were imported, and lists only model files.
"""

import os

import folder_paths

from ..blended.checkpoint import find_config_file
from ..blended.model_files import CLIP_GUIDANCE_FOLDER, GUIDED_DIFFUSION_FOLDER

__all__ = ["CLIP_GUIDANCE_FOLDER", "GUIDED_DIFFUSION_FOLDER", "checkpoint_stamp", "model_file_list",
           "model_file_path", "register_model_folders"]


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


def missing_model_message(name: str, filename) -> str | None:
    """What to tell a user whose model file is not in the ``name`` folder; None when it is there."""
    path = folder_paths.get_full_path(name, str(filename))
    if path is not None and os.path.isfile(path):
        return None
    folders = ", ".join(folder_paths.get_folder_paths(name)) or f"models/{name}"
    return (f"model file {str(filename)!r} was not found in the {name} folder ({folders}). "
            "Put the file there and press R to refresh the list. To fetch the released ones, run "
            "'PYTHONPATH=. python scripts/download_models.py --comfyui <your ComfyUI folder>' in the pack's folder "
            "(README, 'Models').")


def model_file_path(name: str, filename: str) -> str:
    message = missing_model_message(name, filename)
    if message is not None:
        raise FileNotFoundError(message)
    return folder_paths.get_full_path(name, filename)


def checkpoint_stamp(name: str, filename: str) -> str:
    """Path, size and modification time of a model file and of the config.json its loader reads beside it.

    "" when the file is missing: the load itself says so.
    """
    path = folder_paths.get_full_path(name, filename)
    if path is None:
        return ""
    stamps = []
    for file in (path, find_config_file(path)):
        if file is not None and os.path.isfile(file):
            status = os.stat(file)
            stamps.append(f"{file}:{status.st_size}:{status.st_mtime_ns}")
    return " ".join(stamps)

"""Model folders, registered by merging into ``folder_paths`` (never overwriting a user's entries).

Keys (all may also be set in ``extra_model_paths.yaml``):

* ``bagel``             -> ``models/bagel``: checkpoint folders (official BAGEL-7B-MoT layout, fine-tunes in it,
                           DFloat11 folders) and single-file BAGEL ``.safetensors`` (docs/loading.md).
* ``bagel_draft_heads`` -> ``<each bagel folder>/draft_heads``: speculative-decoding draft heads (``.safetensors``).
* ``bagel_distilled``   -> ``<each bagel folder>/distilled``: distilled few-step generation experts (``.safetensors``).

The sub-folders follow every ``bagel`` folder, the user's own ``bagel:`` paths from extra_model_paths.yaml
included (ComfyUI reads that file before it loads custom nodes).
"""
from __future__ import annotations

import os
from typing import MutableMapping

from .adapters import NONE_CHOICE, SINGLE_FILE_EXTS, NodeInputError, checkpoint_entries, files_with_ext

SUBFOLDERS = {  # key -> (sub-folder of each bagel folder, extensions)
    "bagel_draft_heads": ("draft_heads", {".safetensors"}),
    "bagel_distilled": ("distilled", {".safetensors"}),
}
NO_DRAFT_HEAD = "(put a draft head in models/bagel/draft_heads)"
NO_DISTILLED = "(put a distilled expert in models/bagel/distilled)"


def merge_folder(table: MutableMapping, key: str, path: str, extensions: set) -> None:
    """Add ``path`` to ``table[key]`` (created if missing). Existing paths stay first; an existing empty
    extension set (= every file) is kept; otherwise our extensions are added to the user's."""
    if key not in table:
        table[key] = ([path], set(extensions))
        return
    paths, exts = table[key]
    if path not in paths:
        paths.append(path)
    if exts and extensions:
        if isinstance(exts, set):
            exts.update(extensions)
        else:
            table[key] = (paths, set(exts) | set(extensions))


def register_folders() -> None:
    import folder_paths

    table = folder_paths.folder_names_and_paths
    merge_folder(table, "bagel", os.path.join(folder_paths.models_dir, "bagel"), set())
    for root in list(table["bagel"][0]):
        for key, (sub, exts) in SUBFOLDERS.items():
            merge_folder(table, key, os.path.join(root, sub), exts)


def _listing(key: str) -> list[str]:
    import folder_paths

    try:
        return folder_paths.get_filename_list(key)
    except KeyError:
        return []


def checkpoint_choices() -> list[str]:
    return checkpoint_entries(_listing("bagel")) or ["(put a BAGEL checkpoint folder or file in models/bagel)"]


def search_paths(core_formats):
    """``formats.SearchPaths`` of ComfyUI's folders: every bagel path (BAGEL folders lend their tokenizer), every
    vae path (FLUX's ae.safetensors) and the custom_nodes folders (the ComfyUI-BAGEL pack's bundled tokenizer)."""
    import folder_paths

    def get(key):
        try:
            return tuple(folder_paths.get_folder_paths(key))
        except KeyError:
            return ()
    return core_formats.SearchPaths(bagel=get("bagel"), vae=get("vae"), custom_nodes=get("custom_nodes"))


def draft_head_choices() -> list[str]:
    return files_with_ext(_listing("bagel_draft_heads")) or [NO_DRAFT_HEAD]


def distilled_choices() -> list[str]:
    return files_with_ext(_listing("bagel_distilled")) or [NO_DISTILLED]


def relative_name(name, what: str) -> str:
    """``name`` as a relative path that stays inside the folder it is looked up in (no ``..``, no absolute path,
    no drive, no NUL); the model names come from the UI but a queued prompt can hold any string."""
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise NodeInputError(f"{what} {name!r} is not a model name; pick one from the list.")
    rel = os.path.normpath(name.replace("\\", "/").replace("/", os.sep))
    if os.path.isabs(rel) or os.path.splitdrive(rel)[0] or rel == os.pardir or rel.startswith(os.pardir + os.sep) \
            or name.replace("\\", "/").startswith("/"):
        raise NodeInputError(f"{what} {name!r} points outside the model folders; pick a name from the list "
                             "(a path relative to models/bagel).")
    return rel


def resolve_checkpoint(name: str) -> str:
    """Absolute path of a checkpoint listed by ``checkpoint_choices`` (a folder or a single file); a clear error
    otherwise."""
    import folder_paths

    rel = relative_name(name, "checkpoint")
    for root in folder_paths.get_folder_paths("bagel"):
        cand = os.path.join(root, rel)
        if os.path.isfile(os.path.join(cand, "llm_config.json")) or (
                os.path.isfile(cand) and cand.lower().endswith(SINGLE_FILE_EXTS)):
            return cand
    roots = ", ".join(folder_paths.get_folder_paths("bagel"))
    raise FileNotFoundError(f"BAGEL checkpoint {name!r} not found in {roots}. Put the BAGEL-7B-MoT folder "
                            "(llm_config.json, vit_config.json, ema.safetensors, ae.safetensors, tokenizer files) or "
                            "a single-file BAGEL .safetensors there and press 'Refresh'; hyperbagel never downloads "
                            "models.")


def resolve_file(key: str, name: str) -> str:
    import folder_paths

    if not name or name in (NONE_CHOICE, NO_DRAFT_HEAD, NO_DISTILLED):
        raise FileNotFoundError(f"no file chosen: put a .safetensors file in one of the {key} folders "
                                f"({', '.join(folder_paths.get_folder_paths(key))}), press 'Refresh' and pick it, "
                                "or bypass this node (Ctrl+B) to run without it.")
    what = {"bagel_draft_heads": "draft_head", "bagel_distilled": "distilled_expert"}.get(key, key)
    path = folder_paths.get_full_path(key, relative_name(name, what).replace(os.sep, "/"))
    if path is None:
        raise FileNotFoundError(f"{name!r} not found in the {key} folders ({', '.join(folder_paths.get_folder_paths(key))}); "
                                "put it there and press 'Refresh', pick another file, or bypass this node.")
    return path

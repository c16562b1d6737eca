"""ComfyUI model folders this pack reads: registered with ``folder_paths`` (cheap, idempotent)."""
import os


def model_folder(name: str, extensions: set) -> str:
    """Make ``<models>/<name>`` a ComfyUI model folder with these file extensions and return ``name``.

    Paths and extensions another pack or ``extra_model_paths.yaml`` registered under the same name are kept.
    """
    import folder_paths

    default = os.path.join(folder_paths.models_dir, name)
    if name not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[name] = ([default], set(extensions))
        return name
    paths, exts = folder_paths.folder_names_and_paths[name]
    if default not in paths:
        paths.append(default)
    if isinstance(exts, set):
        exts.update(extensions)
    else:
        exts.extend(e for e in extensions if e not in exts)
    return name

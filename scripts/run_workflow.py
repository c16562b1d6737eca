"""Main job: run a shipped workflow headlessly, in-process, and write its pages (or video) to a folder.

    python scripts/run_workflow.py --checkpoint my_sd15.safetensors [--workflow comic_sd15] [--story story.txt]

Uses a ComfyUI install: ``--comfyui /path/to/ComfyUI`` or ``$COMFYUI_PATH`` (a user's checkout: its models/
folders and custom_nodes are used as they are), else the pinned ComfyUI 0.3.75 that
``scripts/setup_test_env.sh`` installs (then every model folder is under ``--models-dir``, default ./models).
The checkpoint is a file name in the install's models/checkpoints folder or a path to a file.
Run it with the Python that has ComfyUI's requirements (for the pinned copy: .venv/bin/python).

Nothing a workflow writes is lost or replaced: images go to ``--out`` (default ./output; ComfyUI numbers
them past existing files), model-folder outputs such as saved character banks to the models folder
(e.g. ./models/sdn_characters), and the job prints the path of every file it wrote, one per line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import sdn_host

WORKFLOWS = sdn_host.PACK_ROOT / "workflows"
EXIT_USAGE = 2


def fail(msg: str) -> int:
    print(f"run_workflow: {msg}", file=sys.stderr)
    return EXIT_USAGE


def resolve_workflow(name: str) -> Path:
    p = Path(name)
    if p.is_file():
        return p
    for cand in (WORKFLOWS / name, WORKFLOWS / f"{name}.json"):
        if cand.is_file():
            return cand
    shipped = ", ".join(sorted(x.stem for x in WORKFLOWS.glob("*.json")))
    raise FileNotFoundError(f"no workflow '{name}'; shipped ones: {shipped}")


def resolve_checkpoint(folder_paths, name: str | None) -> str:
    """Return the checkpoint's name as CheckpointLoaderSimple lists it, registering a file's folder if needed."""
    where = folder_paths.get_folder_paths("checkpoints")
    available = folder_paths.get_filename_list("checkpoints")
    if name:
        p = Path(name).expanduser()
        if p.is_file():
            folder_paths.add_model_folder_path("checkpoints", str(p.parent.resolve()), is_default=True)
            return p.name
        if name in available:
            return name
    hint = (f"available: {', '.join(available)}" if available else "none is installed")
    raise FileNotFoundError(
        f"no usable checkpoint{' ' + repr(name) if name else ''} ({hint}). Put an SD1.5 (comic_sd15, "
        f"transition workflows) or SDXL (comic_sdxl) checkpoint file into {where[0] if where else 'models/checkpoints'} "
        f"and pass its file name, or pass --checkpoint /path/to/model.safetensors.")


def use_models_dir(folder_paths, models: Path) -> None:
    """Move every model folder registered under ComfyUI's current models folder (the pinned copy's temporary
    base directory) to ``models``, so what a workflow saves there (character banks...) outlives the run."""
    old = Path(folder_paths.models_dir)
    for name, (paths, extensions) in list(folder_paths.folder_names_and_paths.items()):
        moved = [str(models / Path(p).relative_to(old)) if Path(p).is_relative_to(old) else p for p in paths]
        folder_paths.folder_names_and_paths[name] = (moved, extensions)
    folder_paths.models_dir = str(models)
    folder_paths.filename_list_cache.clear()


def files_in(folders) -> dict:
    """``{path: (mtime_ns, size)}`` of every file under ``folders`` (missing folders are skipped)."""
    found = {}
    for folder in folders:
        for root, _, names in os.walk(folder):
            for name in names:
                path = Path(root) / name
                try:
                    st = path.stat()
                except OSError:
                    continue
                found[path] = (st.st_mtime_ns, st.st_size)
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="checkpoint file name (in models/checkpoints) or path")
    ap.add_argument("--workflow", default="comic_sd15", help="shipped workflow name (comic_sd15, comic_sdxl) or a .json path")
    ap.add_argument("--story", help="text file with the story (replaces the workflow's story)")
    ap.add_argument("--out", default="output", help="folder for the written files (default ./output)")
    ap.add_argument("--comfyui", help="ComfyUI folder (default $COMFYUI_PATH, else the pinned test copy)")
    ap.add_argument("--models-dir", help="models folder for the pinned copy, read and written (default ./models)")
    ap.add_argument("--steps", type=int, help="override the sampler steps")
    ap.add_argument("--seed", type=int, help="override the sampler seed")
    ap.add_argument("--size", type=int, help="override the panel width and height (pixels)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU")
    args = ap.parse_args(argv)

    try:
        wf_path = resolve_workflow(args.workflow)
    except FileNotFoundError as e:
        return fail(str(e))
    story = None
    if args.story:
        try:
            story = Path(args.story).read_text(encoding="utf-8")
        except OSError as e:
            return fail(f"cannot read --story: {e}")

    user_install = bool(args.comfyui or os.environ.get("COMFYUI_PATH"))
    # The pinned copy runs in a throwaway base directory (input/, temp/, the pack linked into custom_nodes/);
    # its models and outputs are moved to persistent folders before anything runs.
    base = None if user_install else Path(tempfile.mkdtemp(prefix="sdn_run_"))
    try:
        return run_job(args, wf_path, story, base)
    finally:
        if base is not None:
            shutil.rmtree(base, ignore_errors=True)


def run_job(args, wf_path: Path, story: str | None, base: Path | None) -> int:
    try:
        host = sdn_host.bootstrap(base, comfyui=args.comfyui, cpu=True if args.cpu else None)
    except sdn_host.HostError as e:
        return fail(str(e))
    import folder_paths

    if base is not None:
        use_models_dir(folder_paths, Path(args.models_dir or "models").resolve())
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(out_dir))
    # where a workflow may write; taken before --checkpoint's own folder (anywhere on disk) is registered
    watched = {out_dir, *(Path(p) for name, (paths, _) in folder_paths.folder_names_and_paths.items()
                          if name != "custom_nodes" for p in paths)}

    try:
        ckpt = resolve_checkpoint(folder_paths, args.checkpoint)
    except FileNotFoundError as e:
        return fail(str(e))
    workflow = json.loads(wf_path.read_text(encoding="utf-8"))
    try:
        prompt = sdn_host.ui_to_api(workflow, host.nodes.NODE_CLASS_MAPPINGS)
    except sdn_host.WorkflowError as e:
        return fail(f"{wf_path.name}: {e} (is the node pack it needs installed in this ComfyUI?)")
    for node in prompt.values():
        inputs, ctype = node["inputs"], node["class_type"]
        if ctype == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = ckpt
        elif ctype == "SDN_StoryPrompt" and story is not None:
            inputs["story"] = story
        elif ctype in ("KSampler", "KSamplerAdvanced"):
            if args.steps:
                inputs["steps"] = args.steps
            if args.seed is not None:
                inputs["seed" if "seed" in inputs else "noise_seed"] = args.seed
        elif ctype in ("EmptyLatentImage", "SDN_StoryBatches") and args.size:
            inputs.update(width=args.size, height=args.size)
    before = files_in(watched)
    try:
        host.run(prompt)
    except sdn_host.WorkflowError as e:
        return fail(str(e))
    finally:  # a failed run may still have written files
        after = files_in(watched)
        for path in sorted(p for p, stamp in after.items() if before.get(p) != stamp):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

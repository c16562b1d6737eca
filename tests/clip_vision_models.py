"""CLIP vision checkpoints of ComfyUI's real architecture with random weights, for tests (nothing is downloaded).

``write_clip_vision(path, kind="vit_h")`` writes ComfyUI's bundled ViT-H/14 (``comfy/clip_vision_config_h.json``:
32 layers, width 1280, 257 tokens at 224 px, projection 1024; ~1.26 GB in fp16, ~10 s) in the HF-transformers key
layout that ``comfy.clip_vision.load(path)`` detects as ViT-H (it keys on ``encoder.layers.30``), so the stock
``CLIPVisionLoader`` node loads it. Write it once per test session (``tmp_path_factory``) and keep the number of
ViT-H encodes small: about 1-3 s per image on a 2-core CPU.

``kind="small"``: the same ``CLIPVisionModelProjection`` class with 2 layers, width 64, projection 32, 224 px input
and patch 32 -> 7x7 + 1 = 50 tokens (fewer tokens keep predictor training on a CPU fast). ``comfy.clip_vision.load`` cannot detect such a config (its detection needs
23+ layers and would return None), so a copy of the JSON config is written next to the weights
(``config_path(path)``) and ``load_clip_vision(path)`` builds it with ``comfy.clip_vision.ClipVisionModel(json)``
+ ``load_sd`` (the same class the stock loader returns; ``encode_image`` works the same).

Weights: deterministic per ``seed``, ``N(0, 1/fan_in)`` for linear/conv weights, LayerNorm 1/0, position and class
embeddings ``N(0, 0.5)``, so tokens differ by image content and position (ComfyUI's ops leave ``torch.empty``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

SMALL_OVERRIDES = {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 2,
                   "projection_dim": 32, "patch_size": 32}
# What the two kinds give per image: (tokens, hidden width, image_embeds width).
SHAPES = {"vit_h": (257, 1280, 1024), "small": (50, 64, 32)}


def comfy_vit_h_config() -> dict:
    import comfy.clip_vision

    with open(Path(comfy.clip_vision.__file__).parent / "clip_vision_config_h.json") as f:
        return json.load(f)


def model_config(kind: str) -> dict:
    cfg = comfy_vit_h_config()
    if kind == "small":
        cfg.update(SMALL_OVERRIDES)
    elif kind != "vit_h":
        raise ValueError(f"kind must be 'vit_h' or 'small', got {kind!r}")
    return cfg


def config_path(path) -> Path:
    """Where the JSON config of a ``small`` checkpoint lives: ``<path without suffix>.json``."""
    return Path(path).with_suffix(".json")


def random_state_dict(config: dict, seed: int = 0, dtype=torch.float16) -> dict:
    """A state dict for ``comfy.clip_model.CLIPVisionModelProjection(config)`` with deterministic random weights."""
    import comfy.clip_model
    import comfy.ops

    with torch.device("meta"):  # shapes only: no 1.2 GB of garbage allocated
        model = comfy.clip_model.CLIPVisionModelProjection(config, torch.float32, "meta", comfy.ops.manual_cast)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in model.state_dict().items():
        shape = tuple(p.shape)
        if "layer_norm" in name or "layrnorm" in name or "post_layernorm" in name:
            sd[name] = (torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)).to(dtype)
            continue
        if name.endswith("bias"):
            std = 0.02
        elif "position_embedding" in name or "class_embedding" in name:
            std = 0.5
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else shape[0]
            std = fan_in ** -0.5
        # Drawn directly in the target dtype: half the memory traffic of randn + cast (ViT-H has 632M values).
        sd[name] = torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=g)
    return sd


def write_clip_vision(path, kind: str = "vit_h", seed: int = 0, dtype=torch.float16) -> Path:
    """Write a random-weight CLIP vision checkpoint of ``kind`` ("vit_h" | "small") to ``path``; return ``path``.

    Needs ComfyUI importable (call after ``sdn_host.bootstrap``). For ``small`` also writes ``config_path(path)``.
    Idempotent: an existing file written with the same kind and seed is kept.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(path)
    tag = {"sdn_test_kind": kind, "sdn_test_seed": str(seed), "sdn_test_dtype": str(dtype), "sdn_test_init": "2"}
    config = model_config(kind)
    if kind == "small":
        config_path(path).write_text(json.dumps(config, indent=1))
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if f.metadata() == tag:
                    return path
        except Exception:
            pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(random_state_dict(config, seed, dtype), str(tmp), metadata=tag)
    os.replace(tmp, path)
    return path


def shared_clip_vision(tmp_path_factory, kind: str = "vit_h", seed: int = 0) -> Path:
    """The checkpoint of ``kind``/``seed`` in this pytest session's base temp dir, written once per session.

    Any test file can call this with pytest's ``tmp_path_factory``: the path depends only on the session's base
    temp directory, and ``write_clip_vision`` keeps an existing file, so ViT-H (~1.3 GB, ~10 s) is written once.
    Copy or symlink it into ``models/clip_vision`` for the stock CLIPVisionLoader.
    """
    folder = Path(tmp_path_factory.getbasetemp()) / "sdn_clip_vision"
    folder.mkdir(parents=True, exist_ok=True)
    return write_clip_vision(folder / f"{kind}_seed{seed}.safetensors", kind, seed)


def load_clip_vision(path):
    """Load a checkpoint written by ``write_clip_vision`` the way ComfyUI does -> ``comfy.clip_vision.ClipVisionModel``.

    ViT-H: ``comfy.clip_vision.load(path)`` (config detection, the stock loader's path). Small: the JSON config
    next to it via ``ClipVisionModel(json)`` + ``load_sd`` (detection cannot recognise 2 layers).
    """
    import comfy.clip_vision
    import comfy.utils

    cfg = config_path(path)
    if cfg.is_file():
        model = comfy.clip_vision.ClipVisionModel(str(cfg))
        missing, unexpected = model.load_sd(comfy.utils.load_torch_file(str(path)))
        assert not missing and not unexpected, (missing, unexpected)
        return model
    model = comfy.clip_vision.load(str(path))
    assert model is not None, f"comfy.clip_vision.load did not recognise {path}"
    return model


def loader_node(clip_vision):
    """A test-only node class (no inputs) whose output is ``clip_vision``: the stock CLIPVisionLoader only
    recognises full-size encoders."""

    class SmallClipVision:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        RETURN_TYPES = ("CLIP_VISION",)
        FUNCTION = "load"
        CATEGORY = "_for_testing"

        def load(self):
            return (clip_vision,)

    return SmallClipVision

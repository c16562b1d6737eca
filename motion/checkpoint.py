"""Motion predictor files: safetensors weights with the architecture config in the header metadata.

Metadata (all strings, as safetensors requires):
``format = "storydiffusion_native.motion_predictor"``, ``format_version = "1"``, ``config = <JSON of
predictor.config>``, plus any ``extra_metadata`` (training step, encoder file name, data...).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import StoryDiffusionError
from ..files import write_new
from .predictor import ENCODER_OUTPUTS, SemanticMotionPredictor, validate_config

FORMAT_NAME = "storydiffusion_native.motion_predictor"
FORMAT_VERSION = 1
RESERVED_KEYS = ("format", "format_version", "config")


class MotionPredictorFileError(StoryDiffusionError, ValueError):
    """A motion predictor file cannot be used; the message names the file and what is wrong with it."""

    def __init__(self, path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"motion predictor file '{path}': {problem}")


class MotionPredictorCompatError(StoryDiffusionError, ValueError):
    """A motion predictor was trained for another CLIP vision output (kind, width or token count)."""


def save_predictor(predictor: SemanticMotionPredictor, path, extra_metadata: dict | None = None,
                   overwrite: bool = False) -> Path:
    """Write ``predictor``'s weights (their current dtype, moved to CPU) and config to ``path`` (.safetensors).

    ``extra_metadata``: str -> JSON-serialisable values (non-strings are stored as JSON text); the reserved
    keys ``format``, ``format_version``, ``config`` cannot be overridden. Writes atomically (temp file + rename)
    and never replaces an existing file unless ``overwrite`` (``FileExistsError`` naming it).
    """
    from safetensors.torch import save_file

    meta = {}
    for key, value in (extra_metadata or {}).items():
        if key in RESERVED_KEYS:
            raise ValueError(f"extra_metadata key '{key}' is reserved")
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value)
    meta.update(format=FORMAT_NAME, format_version=str(FORMAT_VERSION), config=json.dumps(predictor.config))
    sd = {k: v.detach().to("cpu").contiguous() for k, v in predictor.state_dict().items()}
    return write_new(path, lambda tmp: save_file(sd, tmp, metadata=meta), overwrite)


def read_metadata(path) -> dict:
    """The header metadata of a motion predictor file (strings), checked for format and version.

    Raises ``MotionPredictorFileError`` for a missing/unreadable/corrupt file or a foreign/unknown format.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MotionPredictorFileError(path, "no such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own SafetensorError for truncated/garbled headers
        raise MotionPredictorFileError(
            path, f"not a readable safetensors file (corrupt or truncated?): {type(e).__name__}: {e}") from e
    fmt = meta.get("format")
    if fmt != FORMAT_NAME:
        raise MotionPredictorFileError(
            path, f"metadata 'format' is {fmt!r}, expected {FORMAT_NAME!r} (is this a motion predictor file "
                  "written by save_predictor / scripts/train_motion_predictor.py?)")
    version = meta.get("format_version")
    if version != str(FORMAT_VERSION):
        raise MotionPredictorFileError(
            path, f"format_version {version!r} is not supported (this pack reads version {FORMAT_VERSION}); "
                  "update the node pack")
    if "config" not in meta:
        raise MotionPredictorFileError(path, "metadata has no 'config' (architecture) entry")
    return meta


def load_predictor(path, device=None, dtype=None) -> SemanticMotionPredictor:
    """Build a ``SemanticMotionPredictor`` from a file written by ``save_predictor``; eval mode, no grad needed.

    ``device``/``dtype``: where/in what to put the weights (default: CPU, the stored dtype).
    The header's config is checked against the header's tensor names and shapes with the module built on the
    ``meta`` device, before any weight is allocated or read: a small file claiming a huge model costs nothing.
    Raises ``MotionPredictorFileError`` (naming the file) for: missing or corrupt/truncated file, foreign
    format, unknown version, missing or invalid config, missing/unexpected tensors or wrong tensor shapes.
    """
    from safetensors import safe_open

    path = Path(path)
    meta = read_metadata(path)
    try:
        config = validate_config(json.loads(meta["config"]))
    except (ValueError, TypeError) as e:
        raise MotionPredictorFileError(path, f"invalid architecture config in metadata: {e}") from e
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            layers = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
            if layers != config["layers"]:  # checked first: each claimed layer is a module, even on meta
                raise MotionPredictorFileError(
                    path, f"the config claims {config['layers']} layers, the file holds {layers}")
            try:
                with torch.device("meta"):
                    predictor = SemanticMotionPredictor(config)
            except RuntimeError as e:  # sizes past what a tensor can describe
                raise MotionPredictorFileError(path, f"the config describes no buildable model: {e}") from e
            _check_shapes(path, {k: tuple(v.shape) for k, v in predictor.state_dict().items()}, shapes)
            sd = {k: f.get_tensor(k) for k in shapes}
    except MotionPredictorFileError:
        raise
    except Exception as e:  # safetensors raises its own SafetensorError for unreadable data
        raise MotionPredictorFileError(
            path, f"tensor data unreadable (corrupt or truncated?): {type(e).__name__}: {e}") from e
    if not all(torch.is_floating_point(v) for v in sd.values()):
        raise MotionPredictorFileError(path, "non-float tensors in file")
    stored_dtype = next(iter(sd.values())).dtype if sd else torch.float32
    predictor.load_state_dict(sd, strict=True, assign=True)
    predictor.to(device=device or "cpu", dtype=dtype or stored_dtype)
    predictor.eval().requires_grad_(False)
    return predictor


def predictor_in(payload, node: str) -> SemanticMotionPredictor:
    """The predictor inside an ``SDN_MOTION_PREDICTOR`` payload: the ModelPatcher SDN_MotionPredictorLoader makes
    (``motion.managed.module_patcher``). Raises NodeInputError naming ``node`` and its input ``predictor`` for
    anything else."""
    from ..errors import NodeInputError

    module = getattr(payload, "model", None)
    if not isinstance(module, SemanticMotionPredictor):
        raise NodeInputError(node, "predictor", "an SDN_MOTION_PREDICTOR (SDN_MotionPredictorLoader)",
                             got=type(payload).__name__)
    return module


def _check_shapes(path, expected: dict, found: dict) -> None:
    """Refuse a file whose tensor names/shapes differ from the config's (``name -> shape`` dicts)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k}: file {found[k]} vs config {v}" for k, v in expected.items() if k in found and found[k] != v]
    parts = []
    if wrong:
        parts.append("tensor shapes do not match the stored config: " + "; ".join(wrong[:5])
                     + (f" (+{len(wrong) - 5} more)" if len(wrong) > 5 else ""))
    if missing:
        parts.append(f"missing tensors {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        parts.append(f"unexpected tensors {unexpected[:5]}" + (" ..." if len(unexpected) > 5 else ""))
    if parts:
        raise MotionPredictorFileError(path, "; ".join(parts))


def check_encoder_compat(predictor: SemanticMotionPredictor, clip_vision_output_kind: str, dim: int,
                         tokens: int | None = None) -> None:
    """Refuse a predictor trained for another CLIP vision output.

    ``clip_vision_output_kind``: the ``CLIP_VISION_OUTPUT`` field the caller feeds in,
    ``"penultimate_hidden_states"`` or ``"image_embeds"``; ``dim``: its channel width (last dim, e.g. 1280
    for ViT-H hidden states, 1024 for ViT-H image_embeds, 1024/768 for ViT-L); ``tokens``: tokens per image
    if known (257 for ViT-H/14 at 224 px). Raises ``MotionPredictorCompatError`` saying what the predictor
    expects and what it got; returns None when compatible.
    """
    cfg = predictor.config
    if clip_vision_output_kind not in ENCODER_OUTPUTS:
        raise MotionPredictorCompatError(
            f"unknown CLIP vision output kind {clip_vision_output_kind!r}; expected one of {ENCODER_OUTPUTS}")
    want = f"{cfg['encoder_output']} with {cfg['token_count']} token(s) of {cfg['token_dim']} channels"
    if clip_vision_output_kind != cfg["encoder_output"]:
        raise MotionPredictorCompatError(
            f"the motion predictor was trained on CLIP vision {want}, not on {clip_vision_output_kind}")
    if int(dim) != cfg["token_dim"]:
        raise MotionPredictorCompatError(
            f"the motion predictor was trained on CLIP vision {want}; this CLIP vision model gives {dim} "
            "channels (another encoder: use the CLIP vision model the predictor was trained with)")
    if tokens is not None and int(tokens) != cfg["token_count"]:
        raise MotionPredictorCompatError(
            f"the motion predictor was trained on CLIP vision {want}; this CLIP vision model gives {tokens} "
            "tokens per image (another encoder or image size)")


def tokens_from_clip_vision_output(output, predictor: SemanticMotionPredictor) -> torch.Tensor:
    """The keyframe tokens ``(B, T, C)`` a predictor consumes, taken from a ComfyUI ``CLIP_VISION_OUTPUT``.

    ``output``: ``comfy.clip_vision.Output`` (or anything indexable by field name). Picks
    ``penultimate_hidden_states`` ``(B, T, C)`` or ``image_embeds`` ``(B, C)`` -> ``(B, 1, C)`` according to
    ``predictor.config["encoder_output"]`` and checks it with ``check_encoder_compat``.
    """
    kind = predictor.config["encoder_output"]
    try:
        x = output[kind]
    except (KeyError, AttributeError) as e:
        raise MotionPredictorCompatError(f"the CLIP vision output has no '{kind}' field") from e
    if kind == "image_embeds":
        if x.ndim != 2:
            raise MotionPredictorCompatError(f"image_embeds must be (B, C), got {tuple(x.shape)}")
        x = x.unsqueeze(1)
    elif x.ndim != 3:
        raise MotionPredictorCompatError(f"{kind} must be (B, T, C), got {tuple(x.shape)}")
    check_encoder_compat(predictor, kind, x.shape[-1], tokens=x.shape[1])
    return x

"""Per-frame CLIP image embeddings through a sequence of keyframe images (SMP input/output side).

StoryDiffusion's Semantic Motion Predictor (arXiv 2405.01434, Sec. 3.2) encodes two keyframes with a
CLIP image encoder (ViT-H/14), interpolates the token sets to L frames and lets a transformer predict the
per-frame embeddings that condition a video model through IP-Adapter-style cross-attention. This module
does the encode / interpolate-or-predict / join part with ComfyUI's own ``clip_vision`` model.

Kinds (``embeds_kind``):

* ``"penultimate_hidden_states"``: ViT-H penultimate hidden states, (frames, 257, 1280): what
  IP-Adapter *plus* models take (ComfyUI_IPAdapter_plus EMBEDS for plus models).
* ``"image_embeds"``: projected pooled embeddings, (frames, 1024): plain IP-Adapter.

Frames: K keyframes, L = ``frames_per_transition`` frames per transition including both keyframes;
consecutive transitions share their boundary frame (see :mod:`motion.keyframes`): (K-1)*(L-1)+1 frames.
"""
from __future__ import annotations

import torch

from . import keyframes as kf

NODE = "SDN_TransitionEmbeds"
EMBEDS_KINDS = ("penultimate_hidden_states", "image_embeds")


def encode_keyframes(clip_vision, images: torch.Tensor, crop: bool = True):
    """``clip_vision.encode_image`` on the keyframes (K, H, W, C) -> ``comfy.clip_vision.Output``."""
    return clip_vision.encode_image(images, crop=crop)


def _keyframe_tokens(output, kind: str) -> torch.Tensor:
    x = output[kind]
    return x.unsqueeze(1) if kind == "image_embeds" else x  # (K, T, C)


def _check_predictor(predictor, kind: str, tokens: torch.Tensor):
    from ..errors import NodeInputError
    from .checkpoint import MotionPredictorCompatError, check_encoder_compat, predictor_in

    module = predictor_in(predictor, NODE)
    try:
        check_encoder_compat(module, kind, tokens.shape[-1], tokens=tokens.shape[1])
    except MotionPredictorCompatError as e:
        cfg = module.config
        raise NodeInputError(
            NODE, "predictor",
            f"a predictor for embeds_kind '{kind}' of this CLIP vision model ({tokens.shape[1]} token(s) x "
            f"{tokens.shape[-1]})", got=f"a predictor for {cfg.get('encoder_output')} with "
            f"{cfg.get('token_count')} x {cfg.get('token_dim')} ({e})") from e


def transition_tokens(tokens: torch.Tensor, frames_per_transition: int, interpolation: str = "linear",
                      predictor=None) -> torch.Tensor:
    """Per-frame tokens (F, T, C) for keyframe tokens (K, T, C), joined with shared boundaries.

    Without a predictor: ``motion.predictor.interpolate`` per pair. With one (an ``SDN_MOTION_PREDICTOR``, a
    ModelPatcher): its module is loaded through ComfyUI's model management and called as ``(start, end, L,
    interpolation)`` on all pairs in one batch, on its load device. Output dtype/device = ``tokens``'.
    """
    import comfy.model_management as mm
    from ..errors import NodeInputError
    from . import managed
    from .predictor import interpolate

    start, end = tokens[:-1], tokens[1:]
    if predictor is None:
        seg = interpolate(start, end, frames_per_transition, interpolation)  # (K-1, L, T, C)
    else:
        module = predictor.model
        max_frames = module.config.get("max_frames")
        if max_frames is not None and frames_per_transition > max_frames:
            raise NodeInputError(NODE, "frames_per_transition", f"at most {max_frames} (this predictor's max_frames)",
                                 got=str(frames_per_transition))
        device = managed.load(predictor)
        with torch.no_grad():
            mm.throw_exception_if_processing_interrupted()
            seg = module(start.to(device), end.to(device), frames_per_transition, interpolation)
        seg = seg.to(tokens.device, tokens.dtype)
    return kf.join_transitions(list(seg.unbind(0)))


def transition_embeds(clip_vision, images: torch.Tensor, frames_per_transition: int,
                      interpolation: str = "linear", embeds_kind: str = "penultimate_hidden_states",
                      predictor=None, crop: bool = True):
    """Everything ``SDN_TransitionEmbeds`` outputs.

    images: IMAGE (K, H, W, 3), K >= 2 keyframes in story order; predictor: an ``SDN_MOTION_PREDICTOR``
    (ModelPatcher of a ``SemanticMotionPredictor``) or None (interpolation). Returns ``(embeds, negative_embeds,
    clip_vision_output, frames)``:

    * embeds: (F, 257, 1280) penultimate hidden states or (F, 1024) image_embeds (ViT-H), float32, CPU.
    * negative_embeds: same shape; penultimate kind: the encoding of a black image (what IP-Adapter plus
      uses as its unconditional image), repeated per frame; image_embeds kind: zeros.
    * clip_vision_output: ``comfy.clip_vision.Output`` with per-frame ``image_embeds`` (F, D_proj),
      ``penultimate_hidden_states`` (F, T, D) and ``last_hidden_state`` (F, T, D). The field of the chosen
      kind IS ``embeds`` (predicted or interpolated); the other fields are interpolated from the keyframes'
      encodings with the same interpolation and joining rule (the predictor only models one field).
    * frames: F = (K-1)*(L-1)+1.

    Raises NodeInputError for fewer than 2 keyframes, a bad kind or an incompatible predictor.
    """
    import comfy.clip_vision
    from ..errors import NodeInputError

    if embeds_kind not in EMBEDS_KINDS:
        raise NodeInputError(NODE, "embeds_kind", f"one of {EMBEDS_KINDS}", got=repr(embeds_kind))
    if images.ndim != 4 or images.shape[0] < 2:
        raise NodeInputError(NODE, "keyframes", "an IMAGE batch of at least 2 keyframes (e.g. 2 LoadImage "
                             "joined with ImageBatch, or the story panels)", got=f"shape {tuple(images.shape)}")
    if frames_per_transition < 2:
        raise NodeInputError(NODE, "frames_per_transition", "at least 2 (both keyframes included)",
                             got=str(frames_per_transition))
    k = images.shape[0]
    plus = embeds_kind == "penultimate_hidden_states"
    if plus:  # the black negative image rides along in the same encoder batch
        black = torch.zeros_like(images[:1, :, :, :3])
        batch = torch.cat([images[..., :3], black], dim=0)
    else:
        batch = images
    full = encode_keyframes(clip_vision, batch, crop=crop)
    enc = {f: full[f][:k] for f in ("image_embeds", "penultimate_hidden_states", "last_hidden_state")}
    tokens = _keyframe_tokens(enc, embeds_kind).float()
    if predictor is not None:
        _check_predictor(predictor, embeds_kind, tokens)
    main = transition_tokens(tokens, frames_per_transition, interpolation, predictor)

    out = comfy.clip_vision.Output()
    for field in ("image_embeds", "penultimate_hidden_states", "last_hidden_state"):
        if field == embeds_kind:
            val = main
        else:
            val = transition_tokens(_keyframe_tokens(enc, field).float(), frames_per_transition, interpolation)
        out[field] = val[:, 0] if field == "image_embeds" else val
    embeds = out[embeds_kind]
    if plus:
        neg = full["penultimate_hidden_states"][k:].float()
        negative = neg.expand(embeds.shape[0], -1, -1).contiguous()
    else:
        negative = torch.zeros_like(embeds)
    return embeds, negative, out, embeds.shape[0]

"""Training loop of the Semantic Motion Predictor (``scripts/train_motion_predictor.py`` is its command line).

Objective (our substitute for the paper's end-to-end video loss, which needs the video diffusion model): from
the CLIP vision tokens of a real clip's first and last frame, predict the tokens of the L-2 frames between,
``loss = mse_weight * MSE + cos_weight * (1 - cosine similarity per token)`` over the intermediate frames.
Encodings come from the SAME ComfyUI CLIP vision model used at inference (``comfy.clip_vision``), so the
predictor lives in exactly the space the IP-Adapter nodes consume.

Resumable: ``<out>.state.pt`` holds weights (fp32), AdamW state, step, loss history and the clip sampler's RNG
state; ``resume=True`` continues from it and gives the same loss curve as an uninterrupted run. A new run never
replaces an existing predictor or state (``overwrite=True`` does).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import StoryDiffusionError
from ..files import write_new
from .checkpoint import save_predictor
from .data import (TOKEN_KINDS, ClipSampler, EncodedVideo, EncodeSettings, VideoDataError, VideoEncodingCache,
                   file_digest, list_videos)
from .predictor import SemanticMotionPredictor, interpolate, make_config

STATE_FORMAT = "storydiffusion_native.motion_predictor.train_state/1"


class TrainingFileError(StoryDiffusionError, ValueError):
    """A run would replace an existing predictor or state, or its state file cannot be resumed from."""


@dataclass
class TrainOptions:
    videos: str
    clip_vision: str
    out: str
    clip_vision_config: str | None = None     # JSON config for encoders comfy.clip_vision.load cannot detect
    tokens: str = "penultimate_hidden_states"  # or "image_embeds" (aliases: penultimate, pooled)
    frames: int = 16
    batch: int = 8
    steps: int = 10000
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: int = 0
    grad_clip: float = 1.0
    mse_weight: float = 1.0
    cos_weight: float = 1.0
    seed: int = 0
    device: str = "auto"
    amp: bool = False                          # bf16 autocast on CUDA
    interpolation: str = "linear"
    width: int = 1024
    layers: int = 8
    heads: int = 16
    max_frames: int = 128
    min_span: int | None = None
    max_span: int | None = None
    # decoding and encoding: defaults are EncodeSettings' (one place)
    frame_stride: int = EncodeSettings.frame_stride
    short_side: int = EncodeSettings.short_side
    max_frames_per_video: int | None = EncodeSettings.max_frames_per_video
    crop: bool = EncodeSettings.crop
    cut_threshold: float = EncodeSettings.cut_threshold
    encode_batch: int = EncodeSettings.batch_size
    cache_dir: str | None = None               # default: <out>.cache/
    save_every: int = 1000
    save_dtype: str = "float32"
    resume: bool = False
    overwrite: bool = False                    # a new run may replace an existing predictor and state
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def state_path(self) -> Path:
        return Path(str(self.out) + ".state.pt")


def load_clip_vision(path, config_json=None):
    """Load a CLIP vision model with ComfyUI's own code -> ``comfy.clip_vision.ClipVisionModel``.

    Default: ``comfy.clip_vision.load(path)`` (what the core CLIPVisionLoader node does; detects ViT-H, ViT-L,
    ViT-bigG, SigLIP). ``config_json``: build ``ClipVisionModel(config_json)`` and load the weights strictly, for
    encoders the detection does not know. Raises ``VideoDataError`` when the model is not recognised.
    """
    import comfy.clip_vision
    import comfy.utils

    if config_json:
        model = comfy.clip_vision.ClipVisionModel(str(config_json))
        missing, unexpected = model.load_sd(comfy.utils.load_torch_file(str(path)))
        if missing or unexpected:
            raise VideoDataError(f"CLIP vision '{path}' does not match config '{config_json}': missing "
                                 f"{list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
        return model
    model = comfy.clip_vision.load(str(path))
    if model is None:
        raise VideoDataError(f"ComfyUI does not recognise '{path}' as a CLIP vision model (pass its JSON config "
                             "with --clip-vision-config)")
    return model


def check_outputs(opts: TrainOptions) -> None:
    """Refuse (``TrainingFileError`` naming the files and the flags) a run that would replace an existing
    predictor or training state: anything but resuming from an existing state, unless ``opts.overwrite``."""
    state = opts.state_path()
    if opts.overwrite or (opts.resume and state.is_file()):
        return
    existing = [p for p in (Path(opts.out), state) if p.exists()]
    if not existing:
        return
    files = " and ".join(f"'{p}'" for p in existing)
    resume = (f"pass --resume to continue training from '{state}'" if state.exists() else
              f"--resume cannot continue without the training state '{state}'")
    raise TrainingFileError(f"{files} already exist{'s' if len(existing) == 1 else ''} and a new run would replace "
                            f"{'it' if len(existing) == 1 else 'them'}: {resume}; pass --overwrite to start again "
                            "and replace, or choose another --out")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def clip_loss(pred: torch.Tensor, target: torch.Tensor, mse_weight: float, cos_weight: float) -> dict:
    """Loss over intermediate frames of ``(B, L, T, C)`` tensors: weighted MSE + (1 - per-token cosine)."""
    p, t = pred[:, 1:-1].float(), target[:, 1:-1].float()
    mse = F.mse_loss(p, t)
    cos = 1.0 - F.cosine_similarity(p, t, dim=-1, eps=1e-6).mean()
    return {"loss": mse_weight * mse + cos_weight * cos, "mse": mse, "cos": cos}


def prepare_data(opts: TrainOptions, clip_vision, log=print) -> ClipSampler:
    """Encode (or reuse cached encodings of) every video under ``opts.videos``; return the clip sampler."""
    from tqdm import tqdm

    videos = list_videos(opts.videos)
    if not videos:
        raise VideoDataError(f"no video files ({', '.join(('.mp4', '.webm', '...'))}) under '{opts.videos}'")
    settings = EncodeSettings(token_kind=TOKEN_KINDS[opts.tokens], short_side=opts.short_side,
                              frame_stride=opts.frame_stride, max_frames_per_video=opts.max_frames_per_video,
                              crop=opts.crop, cut_threshold=opts.cut_threshold, batch_size=opts.encode_batch)
    cache = VideoEncodingCache(opts.cache_dir or (str(opts.out) + ".cache"))
    encoder_id = file_digest(opts.clip_vision) + (f"+{file_digest(opts.clip_vision_config)}"
                                                   if opts.clip_vision_config else "")
    encoded, skipped = [], []
    for v in tqdm(videos, desc="encoding videos", disable=not opts.progress, unit="video"):
        try:
            encoded.append(EncodedVideo(cache.ensure(v, clip_vision, encoder_id, settings)))
        except VideoDataError as e:
            skipped.append(str(e))
    if skipped:
        log(f"skipped {len(skipped)} unreadable video(s); first: {skipped[0]}")
    if not encoded:
        raise VideoDataError(f"none of the {len(videos)} videos under '{opts.videos}' could be decoded")
    return ClipSampler(encoded, opts.frames, opts.min_span, opts.max_span)


def train(opts: TrainOptions, clip_vision=None, log=print) -> dict:
    """Train (or resume training) a predictor; write ``opts.out`` (+ ``.state.pt``) and return a summary.

    ``clip_vision``: an already loaded ``ClipVisionModel`` (else loaded from ``opts.clip_vision``). Raises
    ``TrainingFileError`` before any work when the run would replace files (see ``check_outputs``). Must run
    outside ComfyUI's executor (which wraps nodes in ``torch.inference_mode``). Returns ``{"step", "losses"
    (per-step total loss, the whole run including resumed parts), "interp_losses" (the same loss of plain
    interpolation, the baseline to beat), "out", "state"}``.
    """
    from tqdm import tqdm

    if torch.is_inference_mode_enabled():
        raise RuntimeError("train() cannot run under torch.inference_mode (ComfyUI's executor): use the command")
    check_outputs(opts)
    device = pick_device(opts.device)
    if clip_vision is None:
        clip_vision = load_clip_vision(opts.clip_vision, opts.clip_vision_config)
    sampler = prepare_data(opts, clip_vision, log)
    probe = sampler.videos[0].frames([0])  # (1, T, C)
    config = make_config(token_count=int(probe.shape[1]), token_dim=int(probe.shape[2]), width=opts.width,
                         layers=opts.layers, heads=opts.heads, max_frames=max(opts.max_frames, opts.frames),
                         interpolation=opts.interpolation, encoder_output=TOKEN_KINDS[opts.tokens])

    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(opts.seed)
        predictor = SemanticMotionPredictor(config)
    predictor.to(device).train()
    optim = torch.optim.AdamW(predictor.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    gen = torch.Generator().manual_seed(opts.seed)
    step, losses, interp_losses = 0, [], []

    state_path = opts.state_path()
    if opts.resume and state_path.is_file():
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as e:  # the weights-only unpickler and zipfile raise many types
            raise TrainingFileError(f"cannot resume from '{state_path}': unreadable ({type(e).__name__}: "
                                    f"{(str(e).splitlines() or [''])[0][:200]})") from e
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise TrainingFileError(f"'{state_path}' is not a motion predictor training state")
        if state["config"] != predictor.config:
            raise TrainingFileError(f"cannot resume from '{state_path}': architecture differs (saved "
                                    f"{state['config']}, requested {predictor.config})")
        predictor.load_state_dict(state["model"])
        optim.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step, losses, interp_losses = state["step"], list(state["losses"]), list(state["interp_losses"])
        log(f"resumed from {state_path} at step {step}")
    elif opts.resume:
        log(f"no training state at {state_path}: starting from step 0")

    def lr_at(s):
        return opts.lr * min(1.0, (s + 1) / opts.warmup) if opts.warmup > 0 else opts.lr

    def save(final=False):
        meta = {"step": step, "clip_vision": Path(opts.clip_vision).name, "frames": opts.frames,
                "loss": losses[-1] if losses else None, "trained_with": "scripts/train_motion_predictor.py",
                **opts.extra}
        dtype = getattr(torch, opts.save_dtype)
        export = SemanticMotionPredictor(predictor.config)
        export.load_state_dict({k: v.detach().cpu() for k, v in predictor.state_dict().items()})
        # this run's own files (check_outputs ran first)
        save_predictor(export.to(dtype), opts.out, extra_metadata=meta, overwrite=True)
        state = {"format": STATE_FORMAT, "config": predictor.config, "step": step,
                 "model": {k: v.detach().cpu() for k, v in predictor.state_dict().items()},
                 "optimizer": optim.state_dict(), "generator": gen.get_state(), "losses": losses,
                 "interp_losses": interp_losses, "options": asdict(opts)}
        write_new(state_path, lambda tmp: torch.save(state, tmp), overwrite=True)

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if opts.amp and device.type == "cuda" else None)
    bar = tqdm(total=opts.steps, initial=step, desc="training", disable=not opts.progress, unit="step")
    while step < opts.steps:
        clips = sampler.sample(opts.batch, gen).to(device)   # (B, L, T, C) float32
        for g in optim.param_groups:
            g["lr"] = lr_at(step)
        if autocast is not None:
            with autocast:
                pred = predictor(clips[:, 0], clips[:, -1], opts.frames)
        else:
            pred = predictor(clips[:, 0], clips[:, -1], opts.frames)
        parts = clip_loss(pred, clips, opts.mse_weight, opts.cos_weight)
        optim.zero_grad(set_to_none=True)
        parts["loss"].backward()
        if opts.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(predictor.parameters(), opts.grad_clip)
        optim.step()
        with torch.no_grad():
            base = clip_loss(interpolate(clips[:, 0], clips[:, -1], opts.frames, opts.interpolation), clips,
                             opts.mse_weight, opts.cos_weight)["loss"]
        loss = parts["loss"].item()
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {step}; lower --lr or disable --amp")
        losses.append(loss)
        interp_losses.append(float(base))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", interp=f"{float(base):.4f}")
        if opts.save_every and step % opts.save_every == 0 and step < opts.steps:
            save()
    bar.close()
    save(final=True)
    log(f"saved {opts.out} at step {step} (last loss {losses[-1] if losses else float('nan'):.4f}, "
        f"interpolation baseline {interp_losses[-1] if interp_losses else float('nan'):.4f})")
    return {"step": step, "losses": losses, "interp_losses": interp_losses, "out": str(opts.out),
            "state": str(state_path), "config": predictor.config}

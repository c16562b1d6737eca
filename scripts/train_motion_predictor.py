"""Train a Semantic Motion Predictor on a folder of real videos with ComfyUI's own CLIP vision model.

    python scripts/train_motion_predictor.py --videos /data/clips --clip-vision \
        ComfyUI/models/clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors \
        --out ComfyUI/models/motion_predictors/smp_vit_h_16f.safetensors --frames 16 --batch 8 --steps 100000

Bootstraps ComfyUI in this process (``--comfyui`` or ``$COMFYUI_PATH``, else the pinned test copy), loads the
CLIP vision file with ``comfy.clip_vision.load``, encodes every video once (cache: ``<out>.cache/``), then trains
(``motion/train.py``). ``--resume`` continues from ``<out>.state.pt``; an existing predictor or state is never
replaced without ``--overwrite`` (exit code 2 and a message instead). Run ``--help`` for every option.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a StoryDiffusion Semantic Motion Predictor (start/end keyframe CLIP tokens -> "
                    "per-frame tokens) on real videos.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and encoder")
    g.add_argument("--videos", required=True, help="folder of videos (searched recursively) or one video file")
    g.add_argument("--clip-vision", required=True,
                   help="CLIP vision file, the one you will use in ComfyUI (e.g. ViT-H-14 for IP-Adapter SD1.5)")
    g.add_argument("--clip-vision-config", default=None,
                   help="JSON config for an encoder comfy.clip_vision.load cannot detect (tests: small models)")
    g.add_argument("--tokens", default="penultimate_hidden_states",
                   choices=["penultimate_hidden_states", "penultimate", "image_embeds", "pooled"],
                   help="CLIP vision output to predict: penultimate tokens (257x1280 for ViT-H; IP-Adapter plus) "
                        "or pooled image_embeds (1x1024; plain IP-Adapter)")
    g.add_argument("--frame-stride", type=int, default=1, help="decode every k-th frame (24-30 fps video: 2-3)")
    g.add_argument("--short-side", type=int, default=224, help="decode size (short side, px) before CLIP preprocess")
    g.add_argument("--max-frames-per-video", type=int, default=600, help="cap on decoded frames per video")
    g.add_argument("--no-crop", action="store_true", help="squash instead of centre-crop (CLIPVisionEncode crop=none)")
    g.add_argument("--cut-threshold", type=float, default=0.12, help="shot-cut threshold (mean abs thumbnail diff)")
    g.add_argument("--encode-batch", type=int, default=16, help="frames per CLIP vision call")
    g.add_argument("--cache-dir", default=None, help="where per-video encodings go (default: <out>.cache/)")
    g = p.add_argument_group("clips and model")
    g.add_argument("--frames", type=int, default=16, help="frames per clip L, keyframes included")
    g.add_argument("--min-span", type=int, default=None, help="min start-to-end distance in decoded frames (L-1)")
    g.add_argument("--max-span", type=int, default=None, help="max start-to-end distance in decoded frames (3(L-1))")
    g.add_argument("--interpolation", choices=["linear", "slerp"], default="linear")
    g.add_argument("--width", type=int, default=1024)
    g.add_argument("--layers", type=int, default=8)
    g.add_argument("--heads", type=int, default=16)
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=10000, help="total optimizer steps (resume counts the saved ones)")
    g.add_argument("--batch", type=int, default=8, help="clips per step")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup", type=int, default=0, help="linear learning-rate warm-up steps")
    g.add_argument("--grad-clip", type=float, default=1.0, help="0 disables")
    g.add_argument("--mse-weight", type=float, default=1.0)
    g.add_argument("--cos-weight", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="predictor .safetensors to write (models/motion_predictors/...)")
    g.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    g.add_argument("--save-dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    g.add_argument("--resume", action="store_true", help="continue from <out>.state.pt if it exists")
    g.add_argument("--overwrite", action="store_true",
                   help="start again even if <out> or <out>.state.pt exist, replacing them (never done otherwise)")
    g.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("ComfyUI")
    g.add_argument("--comfyui", default=None, help="ComfyUI folder (default: $COMFYUI_PATH, else the pinned copy)")
    return p


def options_from_args(args, TrainOptions):
    """argparse namespace -> ``motion.train.TrainOptions``."""
    return TrainOptions(
        videos=args.videos, clip_vision=args.clip_vision, out=args.out, clip_vision_config=args.clip_vision_config,
        tokens=args.tokens, frames=args.frames, batch=args.batch, steps=args.steps, lr=args.lr,
        weight_decay=args.weight_decay, warmup=args.warmup, grad_clip=args.grad_clip, mse_weight=args.mse_weight,
        cos_weight=args.cos_weight, seed=args.seed, device=args.device, amp=args.amp,
        interpolation=args.interpolation, width=args.width, layers=args.layers, heads=args.heads,
        min_span=args.min_span, max_span=args.max_span, frame_stride=args.frame_stride, short_side=args.short_side,
        max_frames_per_video=args.max_frames_per_video, crop=not args.no_crop, cut_threshold=args.cut_threshold,
        encode_batch=args.encode_batch, cache_dir=args.cache_dir, save_every=args.save_every,
        save_dtype=args.save_dtype, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/ only, never the pack root
    import sdn_host

    cpu = True if args.device == "cpu" else None
    with tempfile.TemporaryDirectory(prefix="sdn_train_") as base:
        host = sdn_host.bootstrap(base, comfyui=args.comfyui, cpu=cpu)
        train_mod = host.pack_module("motion.train")
        try:
            result = train_mod.train(options_from_args(args, train_mod.TrainOptions))
        except train_mod.TrainingFileError as e:
            print(f"train_motion_predictor: {e}", file=sys.stderr)
            return 2
    print(f"done: {result['out']} (step {result['step']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

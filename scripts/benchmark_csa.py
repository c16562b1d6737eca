"""Benchmark: plain self-attention vs Consistent Self-Attention, one attention layer, side by side.

Shapes are real UNet decoder self-attention layers (B = 4 images, CFG: 8 rows): SDXL at 1024 px
(1/16: 4096 tokens x 640 = 10 heads x 64; 1/32: 1024 tokens x 1280 = 20 x 64) and SD1.5 at 512 px
(1/8: 4096 x 320 = 8 x 40; 1/16: 1024 x 640; 1/32: 256 x 1280). Columns:
  plain      plain self-attention of the same rows (the cost of an unpatched layer)
  bound      (N + N_extra) / N: exact CSA must score every extra key, so its cost is at least this x plain
  csa        this pack's batched CSA (gather + one attention call), time / plain
  csa/bound  how close CSA gets to the floor (goal: <= 1.2)
  naive      a per-image Python loop building P_i one at a time from projected keys, time / plain
  re-proj    the reference app's way: a per-image loop that concatenates the hidden states of its own and the
             sampled tokens and projects keys/values again (shared tokens re-projected per image), time / plain
Usage: python scripts/benchmark_csa.py [--device cuda] [--dtype fp16] [--rate 0.5] [--images 4]
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time
from pathlib import Path

import torch

PACK = Path(__file__).resolve().parent.parent


def load_csa():
    # The pure core only needs torch: load attention/csa.py by path (the pack root must not go on sys.path).
    spec = importlib.util.spec_from_file_location("sdn_csa_core", PACK / "attention" / "csa.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


SHAPES = [  # (label, tokens N, heads, dim_head)
    ("SDXL 1024px 1/16", 4096, 10, 64),
    ("SDXL 1024px 1/32", 1024, 20, 64),
    ("SD1.5 512px 1/8", 4096, 8, 40),
    ("SD1.5 512px 1/16", 1024, 8, 80),
    ("SD1.5 512px 1/32", 256, 8, 160),
]


def timeit(fn, device, repeats):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def reprojecting_loop(csa, q, hidden, w_k, w_v, heads, plan):
    """Per image: keys/values projected from [own hidden states; sampled hidden states of the others]."""
    b, n = plan.num_images, plan.num_tokens
    g = q.shape[0] // b
    h4 = hidden.reshape(g, b, n, -1)
    outs = []
    for chunk in range(g):
        flat = h4[chunk].reshape(b * n, -1)
        for i in range(b):
            ctx = torch.cat((h4[chunk, i], flat[plan.all_idx[i]]), 0)[None]
            outs.append(csa.sdpa_attention(q[chunk * b + i][None], ctx @ w_k, ctx @ w_v, heads))
    return torch.cat(outs, 0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--rate", type=float, default=0.5)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--references", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--shapes", default="all", help="comma-separated indices into the shape list")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    csa = load_csa()
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'CPU'} ({torch.get_num_threads()} threads)"
    print(f"# device: {name}; torch {torch.__version__}; dtype {dtype}; B = {args.images} images x 2 CFG halves; "
          f"rate {args.rate}; references {args.references}; best of {repeats}")
    print(f"{'layer':<18} {'N':>5} {'plain':>10} {'bound':>6} {'csa':>6} {'csa/bound':>9} {'naive':>6} {'re-proj':>7}")
    gen = torch.Generator().manual_seed(0)
    for label, n, heads, dh in shapes:
        b, c = args.images, heads * dh
        q, k, v = (torch.randn(2 * b, n, c, generator=gen).to(device, dtype) for _ in range(3))
        plan = csa.make_plan(b, n, args.rate, args.references, torch.Generator().manual_seed(1)).to(device)
        r = args.references
        per = plan.per_source
        if r == 0 or r >= b:
            extra_keys = (b - 1) * per * b
        else:
            extra_keys = r * max(r - 1, 0) * per + (b - r) * r * per
        bound = (b * n + extra_keys) / (b * n)
        t_plain = timeit(lambda: csa.sdpa_attention(q, k, v, heads), device, repeats)
        t_csa = timeit(lambda: csa.consistent_self_attention(q, k, v, heads, plan), device, repeats)
        t_naive = timeit(lambda: csa.naive_consistent_self_attention(q, k, v, heads, plan), device, repeats)
        hidden = torch.randn(2 * b, n, c, generator=gen).to(device, dtype)
        w_k, w_v = (torch.randn(c, c, generator=gen).to(device, dtype) / c ** 0.5 for _ in range(2))
        t_reproj = timeit(lambda: reprojecting_loop(csa, q, hidden, w_k, w_v, heads, plan), device, repeats)
        print(f"{label:<18} {n:>5} {t_plain * 1e3:>8.2f}ms {bound:>6.2f} {t_csa / t_plain:>6.2f} "
              f"{t_csa / t_plain / bound:>9.2f} {t_naive / t_plain:>6.2f} {t_reproj / t_plain:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

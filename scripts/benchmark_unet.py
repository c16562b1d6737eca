"""Benchmark: one UNet step with StoryDiffusion's attention beside the vanilla step, and the size of its banks.

Full-size SD1.5 and SDXL UNets (the real comfy.supported_models configurations, random weights), B story images
x 2 CFG halves, one sampler step through ComfyUI's stock sampler (Euler: one model call), rate 0.5 on the
decoder's self-attention (the reference app's layers). Modes:
  vanilla     the unpatched model
  csa         CSA batch mode (all-to-all, the paper)
  read fp16   the B images read a bank recorded (not timed) from R references, stored in fp16
  read fp8    the same bank stored in fp8 (e4m3, one scale per token)
  bank-free   the R references in front of the B images, CSA reference_count = R: the same tokens, no bank
  subject     CSA with subject masks (issue 10), one character per panel: the extra keys only where the other
              images' character masks are (given masks, half of each image), one key-masked attention call
  two chars   subject masks, every panel naming two characters: one call per character plus one over the own
              tokens for queries in neither region (the floor counts all three)
Columns: seconds per step (best of --repeats; on the CPU the process's CPU seconds, all threads, so that other
load on a shared machine does not count); x vanilla; floor: the FLOP floor over vanilla (the UNet's FLOPs
counted on the meta device, plus the decoder's attention over the extra keys, 4 N E C per row and layer, the
bank tokens' projection and, bank-free, the R extra images); host syncs per model call (counted on the same
layout at small width, where the ops are the same: the vanilla model's own plus what the pack adds); bank
bytes and their ratio to the reference app's (R x M x C x 2 bytes x 2 halves per recorded step and layer).
Then bank bytes at the reference app's settings (SDXL 1024 px, 1 reference, rate 0.5, 35 steps), by formula.
Usage: python scripts/benchmark_unet.py [--device cuda] [--models sd15,sdxl] [--size 256] [--images 4]
"""
from __future__ import annotations

import argparse
import gc
import sys

from bench_common import DTYPES, best_of, csa_floors, start

REPORTED = "1.96-2.3"  # the reference app's SDXL step over vanilla, as reported


def unet_flops(model, latent_hw, rows: int) -> float:
    """FLOPs of one UNet forward of ``rows`` rows, counted on the meta device (no memory, no compute)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    config = model.model.model_config
    meta = type(config)(dict(config.unet_config)).get_model({}, device=torch.device("meta")).diffusion_model
    adm = config.unet_config.get("adm_in_channels")
    extra = {"y": torch.zeros(rows, adm, device="meta")} if adm else {}
    with FlopCounterMode(display=False) as counter:
        meta(torch.zeros(rows, 4, *latent_hw, device="meta"), torch.zeros(rows, device="meta"),
             context=torch.zeros(rows, 77, config.unet_config["context_dim"], device="meta"),
             transformer_options={}, **extra)
    return counter.get_total_flops()


def floors(decoder: list, unet_per_row: float, images: int, refs: int) -> dict:
    """FLOP floor of every mode over vanilla. ``decoder``: ``[(N, M, C), ...]`` per patched layer. Every extra
    key is scored once (QK^T and AV: 4 N E C per row), bank tokens are projected once per half (k, v: 4 E C^2)."""
    read = sum(4 * n * refs * m * c * images * 2 + 2 * 4 * refs * m * c * c for n, m, c in decoder)
    read = 1 + read / (unet_per_row * images * 2)
    base = csa_floors(decoder, unet_per_row, images, refs, 2)
    # two characters: two calls over own + extra keys and one over own keys, where vanilla makes one over own keys
    two = sum(4 * n * c * (2 * (n + (images - 1) * m)) for n, m, c in decoder) * images * 2
    return {**base, "read fp16": read, "read fp8": read, "subject": base["csa"],
            "two chars": 1 + two / (unet_per_row * images * 2)}


def subject_models(pack, model, settings, images: int) -> dict:
    """``{mode: model}`` of the subject-mask modes: given masks (the left or right half of each image, by
    character) on SDN_CharacterMasks' model, CSA with subject_masks."""
    import dataclasses

    import torch

    patch, masks, parser = pack("attention.patch"), pack("attention.masks"), pack("story.parser")
    subject = patch.apply_csa(model, dataclasses.replace(settings, subject_masks=True))
    given = torch.zeros(images, 2, 8, 8)
    given[:, 0, :, :4], given[:, 1, :, 4:] = 1.0, 1.0
    out = {}
    for mode, panel in (("subject", "[A] walks"), ("two chars", "[A] and [B] talk")):
        story = parser.parse_story("[A] a fox\n[B] a cat\n---\n" + f"{panel}\n" * images)
        out[mode] = masks.apply_masks(subject, story, given)[0]
    return out


def reference_app_bytes(decoder: list, refs: int, steps: int) -> int:
    """The reference app's bank: fp16 hidden states of R x M tokens per decoder layer, both halves, every step."""
    return steps * sum(refs * m * c * 2 * 2 for _, m, c in decoder)


def formula_rows(pack) -> list:
    """(schedule, storage, bytes, reference app's bytes) at its settings: SDXL 1024 px, 1 reference, rate 0.5,
    35 steps. Its schedule never uses step 0 and skips layer calls at random: nothing is kept for them."""
    context, csa = pack("attention.context"), pack("attention.csa")
    decoder = [(("output", b, d), 1024 if b < 3 else 4096, 1280 if b < 3 else 640)
               for b in range(6) for d in range(10 if b < 3 else 2)]
    reference = reference_app_bytes([(n, csa.tokens_per_source(n, 0.5), c) for _, n, c in decoder], 1, 35)
    rows = []
    for schedule in ("storydiffusion", "always"):
        kept = [(csa.tokens_per_source(n, 0.5), c) for step in range(35) for key, n, c in decoder
                if schedule == "always" or context.gate_open(0, step, key)]
        values, tokens = 2 * sum(m * c for m, c in kept), 2 * sum(m for m, _ in kept)  # both halves
        rows += [(schedule, "fp16", 2 * values, reference), (schedule, "fp8", values + 4 * tokens, reference)]
    return rows


def host_syncs(pack, kind: str, images: int, refs: int, settings) -> dict:
    """Host syncs per model call of every mode, on the same layout at small width (two steps: two calls)."""
    import torch
    from host_syncs import syncs_per_call
    from models import small_unet

    patch, bank_mod = pack("attention.patch"), pack("attention.bank")
    tiny = small_unet(kind, scale=0.05)
    csa = patch.apply_csa(tiny, settings)
    out = {"vanilla": syncs_per_call(tiny, images, kind), "csa": syncs_per_call(csa, images, kind)}
    for label, storage in (("read fp16", torch.float16), ("read fp8", torch.float8_e4m3fn)):
        rec = bank_mod.BankRecorder(storage_dtype=storage)
        syncs_per_call(patch.apply_recording(csa, rec), refs, kind)
        reading = patch.apply_reading(tiny, patch.BankReader((bank_mod.CharacterBank.from_recorder(rec, "x", ""),)))
        out[label] = syncs_per_call(reading, images, kind)
    free = patch.apply_csa(tiny, patch.CSASettings(rates=settings.rates, reference_count=refs))
    out["bank-free"] = syncs_per_call(free, images + refs, kind)
    for mode, m in subject_models(pack, tiny, settings, images).items():
        out[mode] = syncs_per_call(m, images, kind)
    return out


def benchmark(pack, kind: str, size: int, args, dtype, device, cuda: bool) -> None:
    import comfy.model_management
    import comfy.patcher_extension as ext
    import comfy.sample
    import torch
    from models import small_unet

    patch, bank_mod, context, csa_core = (pack(m) for m in ("attention.patch", "attention.bank", "attention.context",
                                                            "attention.csa"))
    b, r, rate = args.images, args.refs, args.rate
    hw = (size // 8, size // 8)
    width = 2048 if kind == "sdxl" else 768
    model = small_unet(kind, tiny=False, context_dim=width, dtype=dtype, device=device)
    settings = patch.CSASettings(rates=((8, rate), (16, rate), (32, rate)))
    csa = patch.apply_csa(model, settings)
    gen = torch.Generator().manual_seed(0)

    def conds(n):
        extra = {"pooled_output": torch.randn(n, 1280, generator=gen)} if kind == "sdxl" else {}
        return [[torch.randn(n, 77, width, generator=gen), extra]]
    negative, story, references = conds(1), conds(b), conds(r)
    together = [[torch.cat((references[0][0], story[0][0])),
                 {k: torch.cat((references[0][1][k], v)) for k, v in story[0][1].items()}]]

    def step(m, positive):
        n = positive[0][0].shape[0]
        latent = torch.zeros(n, 4, *hw)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
        comfy.sample.sample(m, noise, 1, 5.0, "euler", "normal", positive, negative, latent, seed=0,
                            disable_pbar=True)

    banks = {}
    for label, storage in (("read fp16", torch.float16), ("read fp8", torch.float8_e4m3fn)):
        rec = bank_mod.BankRecorder(storage_dtype=storage)
        step(patch.apply_recording(csa, rec), references)
        banks[label] = bank_mod.CharacterBank.from_recorder(rec, "hero", "")
    modes = {"vanilla": (model, story), "csa": (csa, story),
             **{label: (patch.apply_reading(model, patch.BankReader((bank,))), story) for label, bank in banks.items()},
             "bank-free": (patch.apply_csa(model, patch.CSASettings(rates=settings.rates, reference_count=r)),
                           together),
             **{mode: (m, story) for mode, m in subject_models(pack, model, settings, b).items()}}
    times = best_of({mode: (lambda m=m, p=p: step(m, p)) for mode, (m, p) in modes.items()},
                    args.repeats or (5 if cuda else 2), cuda)

    (spec,) = csa.get_wrappers(ext.WrappersMP.APPLY_MODEL, patch.WRAPPER)
    decoder = []
    for layer in spec.layers.values():
        n = context.level_tokens(hw, layer.factor)
        decoder.append((n, csa_core.tokens_per_source(n, rate), layer.channels))
    floor = floors(decoder, unet_flops(model, hw, 2) / 2, b, r)
    syncs = host_syncs(pack, kind, b, r, settings)
    for mode in modes:
        bank, size_cols = banks.get(mode), ""
        if bank is not None:
            reference = reference_app_bytes(decoder, r, len(bank.steps))
            size_cols = f" {bank.size_bytes / 2**20:>9.2f} {bank.size_bytes / reference:>9.3f}"
        print(f"{kind:<6} {size:>5} {mode:<10} {times[mode]:>8.2f} {times[mode] / times['vanilla']:>9.2f} "
              f"{floor[mode]:>6.3f} {syncs[mode]:>10.1f}{size_cols}", flush=True)
    print(f"{kind:<6} {size:>5} {'ref app':<10} {'':>8} {REPORTED:>9}   (reported, SDXL)", flush=True)
    comfy.model_management.unload_all_models()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"])
    ap.add_argument("--models", default="sd15,sdxl")
    ap.add_argument("--size", type=int, default=None,
                    help="pixels (default: 256 on the CPU; on CUDA SD1.5 512, SDXL 1024)")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--refs", type=int, default=1)
    ap.add_argument("--rate", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per mode, best taken (CPU 2, CUDA 5)")
    ap.add_argument("--dtype", default=None, choices=DTYPES, help="default: fp16 on CUDA, else fp32")
    args = ap.parse_args(argv)
    host, cuda, device, dtype, machine = start(args.device, args.dtype)
    print(f"# {machine}; B = {args.images} images x 2 CFG halves, R = "
          f"{args.refs} reference(s), rate {args.rate} on the decoder; one Euler step")
    print(f"{'model':<6} {'px':>5} {'mode':<10} {'s/step':>8} {'x vanilla':>9} {'floor':>6} {'syncs/call':>10} "
          f"{'bank MiB':>9} {'x ref app':>9}")
    for kind in args.models.split(","):
        size = args.size or ((1024 if kind == "sdxl" else 512) if cuda else 256)
        benchmark(host.pack_module, kind, size, args, dtype, device, cuda)
        gc.collect()
    print("\n# bank bytes at the reference app's settings: SDXL 1024 px, 1 reference, rate 0.5, 35 steps, 36 "
          "decoder layers, both CFG halves (the reference app keeps fp16, every step and layer)")
    print(f"{'schedule':<15} {'storage':<8} {'GB':>7} {'x ref app':>9}")
    for schedule, storage, size, reference in formula_rows(host.pack_module):
        print(f"{schedule:<15} {storage:<8} {size / 1e9:>7.3f} {size / reference:>9.3f}")
    print(f"{'reference app':<15} {'fp16':<8} {reference / 1e9:>7.3f} {1:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

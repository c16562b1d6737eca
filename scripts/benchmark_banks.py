"""Benchmark: story length vs peak memory and time per panel, reference mode (character bank) beside batch mode.

Every configuration runs in a fresh subprocess (peak memory = that process's peak RSS above its baseline after
the model is built; on CUDA, torch's peak allocated memory). Model: the real SD1.5 block layout at reduced
width (see tests/models.py), 256 px, 2 Euler steps, CFG 5, CSA rate 0.5 on the decoder.
  read (bank)     1 reference recorded once, then P panels drawn in batches of 4 (what SDN_StoryBatches makes
                  the stock KSampler do), each attending to its own tokens + the bank
  batch           all P panels in one batch, CSA all-to-all (the paper)
  batch, tile 4   all P panels in one batch, each sharing with the 3 panels around it (sliding window)
Usage: python scripts/benchmark_banks.py [--panels 4,16,64] [--width 64]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(mode: str, panels: int, width: int, batch: int) -> dict:
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent / "tests"))
    import sdn_host

    host = sdn_host.bootstrap(tempfile.mkdtemp(prefix="sdn_bench_"))
    import comfy.sample
    import torch

    from models import small_unet

    patch, bank_mod = host.pack_module("attention.patch"), host.pack_module("attention.bank")
    model = small_unet("sd15", tiny=True, context_dim=64)
    model.model.diffusion_model.to(torch.float32)
    size, steps = 32, 2  # latent 32x32 = 256 px
    gen = torch.Generator().manual_seed(0)
    conds = torch.randn(panels, 77, 64, generator=gen)
    negative = [[torch.randn(1, 77, 64, generator=gen), {}]]

    def run(m, cond):
        b = cond.shape[0]
        latent = torch.zeros(b, 4, size, size)
        noise = comfy.sample.prepare_noise(latent, 0)
        return comfy.sample.sample(m, noise, steps, 5.0, "euler", "normal", [[cond, {}]], negative, latent,
                                   seed=0, disable_pbar=True)

    settings = dict(rates=((8, 0.5), (16, 0.5), (32, 0.5)))
    csa = patch.apply_csa(model, patch.CSASettings(**settings, tile_size=4 if mode == "tile" else 0))
    if mode == "read":
        rec = bank_mod.BankRecorder(fingerprint=bank_mod.model_fingerprint(csa))
        run(patch.apply_recording(csa, rec), conds[:1])  # 1 reference, recorded before measuring
        bank = bank_mod.CharacterBank.from_recorder(rec, "hero", "")
        reader = patch.apply_reading(model, patch.BankReader((bank,)))
    cuda = torch.cuda.is_available()
    base = peak_rss_mib()
    t = time.perf_counter()
    if mode == "read":
        for i in range(0, panels, batch):
            run(reader, conds[i:i + batch])
    else:
        run(csa, conds)
    elapsed = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() / 2**20) if cuda else peak_rss_mib() - base
    return {"time_per_panel": elapsed / panels, "peak_mib": peak}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--panels", default="4,16,64")
    ap.add_argument("--batch", type=int, default=4, help="read-phase batch size")
    ap.add_argument("--width", type=int, default=32, help="UNet model_channels (real layout, reduced width)")
    ap.add_argument("--one", nargs=2, metavar=("MODE", "PANELS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(one(args.one[0], int(args.one[1]), args.width, args.batch)))
        return 0
    counts = [int(x) for x in args.panels.split(",")]
    print(f"# machine: {platform.machine()} {os.cpu_count()} cores; SD1.5 layout (model_channels {args.width}), "
          f"256 px, 2 steps, CFG 5, rate 0.5; peak = memory above the process baseline")
    print(f"{'mode':<16} {'panels':>6} {'peak MiB':>9} {'s/panel':>8}  {'peak vs 4':>9} {'time vs 4':>9}")
    for mode, label in (("read", "read (bank)"), ("batch", "batch"), ("tile", "batch, tile 4")):
        first = None
        for p in counts:
            proc = subprocess.run([sys.executable, __file__, "--one", mode, str(p), "--width", str(args.width),
                                   "--batch", str(args.batch)], capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                print(f"{label:<16} {p:>6}  failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(line[0][7:])
            first = first or r
            print(f"{label:<16} {p:>6} {r['peak_mib']:>9.1f} {r['time_per_panel']:>8.3f}  "
                  f"{r['peak_mib'] / max(first['peak_mib'], 1e-6):>9.2f} {r['time_per_panel'] / first['time_per_panel']:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

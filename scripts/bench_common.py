"""What the step benchmarks (benchmark_unet.py, benchmark_dit.py) share: starting the host, the machine line,
round-robin timing and the FLOP floor of CSA's extra keys."""
from __future__ import annotations

import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DTYPES = ("fp16", "bf16", "fp32")


def start(device: str | None, dtype: str | None, cuda_dtype: str = "fp16"):
    """Start ComfyUI with the pack (scripts/sdn_host.py). Returns (host, cuda, device, dtype, machine line).
    ``device``: "cpu", "cuda" or None (CUDA when present); ``dtype``: one of DTYPES, default ``cuda_dtype`` on CUDA, else fp32."""
    sys.path.insert(0, str(HERE))  # never the repo root (its nodes/ would shadow ComfyUI's nodes.py)
    sys.path.insert(0, str(HERE.parent / "tests"))
    import sdn_host
    import torch

    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    host = sdn_host.bootstrap(tempfile.mkdtemp(prefix="sdn_bench_"), cpu=not cuda)
    import comfy.model_management

    dev = comfy.model_management.get_torch_device()
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype or (cuda_dtype if cuda else "fp32")]
    machine = torch.cuda.get_device_name(dev) if cuda else \
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    return host, cuda, dev, dt, f"{machine}; torch {torch.__version__}; {dt}"


def best_of(modes: dict, repeats: int, cuda: bool) -> dict:
    """Seconds of each ``{mode: fn}`` call, best of ``repeats``, round robin so that drifting load hits every mode
    alike. CUDA: wall time after a synchronize; CPU: the process's own CPU seconds (all threads), whatever else
    runs on a shared machine."""
    import torch

    clock = time.perf_counter if cuda else time.process_time
    times = dict.fromkeys(modes, float("inf"))
    for _ in range(repeats):
        for mode, fn in modes.items():
            t = clock()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times[mode] = min(times[mode], clock() - t)
    return times


def csa_floors(layers: list, per_row: float, images: int, refs: int, halves: int) -> dict:
    """FLOP floor over vanilla of all-to-all CSA ("csa") and of R references in front of the B images with CSA
    reference_count = R ("bank-free"). ``layers``: ``[(N, M, C), ...]`` per patched layer (N queries that see the
    extra keys, M tokens taken from each other image, width C); ``per_row``: FLOPs of the unpatched model for one
    row; ``halves``: rows per image (2 with CFG). Every extra key is scored once per query (QK^T and AV: 4 N M C)."""
    pair = sum(4 * n * m * c for n, m, c in layers) * halves  # one image seeing M tokens of one other image
    vanilla = per_row * images * halves
    return {"vanilla": 1.0, "csa": 1 + pair * images * (images - 1) / vanilla,
            "bank-free": (per_row * (images + refs) * halves + pair * (images * refs + refs * max(refs - 1, 0)))
            / vanilla}

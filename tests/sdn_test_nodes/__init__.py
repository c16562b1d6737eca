"""Test-only ComfyUI node pack: small real-architecture models for workflow tests.

``SDNTest_TinyCheckpoint`` stands in for CheckpointLoaderSimple: a MODEL with the real SD1.5 or SDXL block
layout but small widths (fast on CPU), the real CLIP text encoders of that family and the real SD VAE, all
with random weights. Loaded by tests/conftest.py through ComfyUI's custom-node loader; never shipped.
"""
import sys
from pathlib import Path

from comfy_api.latest import ComfyExtension, io

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class TinyCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SDNTest_TinyCheckpoint", category="_for_testing",
            inputs=[io.Combo.Input("kind", options=["sd15", "sdxl"]), io.Int.Input("seed", default=0)],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()])

    @classmethod
    def execute(cls, kind, seed):
        from checkpoints import random_clip, random_vae
        from models import small_unet

        model = small_unet(kind, seed=seed, context_dim=768 if kind == "sd15" else 2048)
        return io.NodeOutput(model, random_clip(kind, seed), random_vae(seed))


class TestExtension(ComfyExtension):
    async def get_node_list(self):
        return [TinyCheckpoint]


async def comfy_entrypoint():
    return TestExtension()

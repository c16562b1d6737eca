"""Test-only ComfyUI node pack: small real-architecture models for workflow tests.

``SDNTest_TinyCheckpoint`` stands in for CheckpointLoaderSimple: a MODEL with the real SD1.5 or SDXL block
layout but small widths (fast on CPU), the real CLIP text encoders of that family and the real SD VAE, all
with random weights. ``SDNTest_TinyTextEncoders`` stands in for DualCLIPLoader (type flux) on small CLIP-L and
T5-XXL files (see tests/checkpoints.py ``write_random_flux_files``), ``SDNTest_TinyTextEncoder`` for CLIPLoader
(type qwen_image) on a one-layer Qwen2.5-VL 7B file (``write_random_qwen_image_files``). Loaded by
tests/conftest.py through ComfyUI's custom-node loader; never shipped.
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


class TinyTextEncoders(io.ComfyNode):
    """DualCLIPLoader (type flux) for small files: the same ComfyUI function (``load_text_encoder_state_dicts``:
    same classes, tokenizers and key format), plus ComfyUI's per-encoder config override for the small widths,
    which the stock node cannot pass (it builds CLIP-L and T5-XXL from their full-size JSON configs)."""

    @classmethod
    def define_schema(cls):
        import folder_paths

        files = folder_paths.get_filename_list("text_encoders")
        return io.Schema(
            node_id="SDNTest_TinyTextEncoders", category="_for_testing",
            inputs=[io.Combo.Input("clip_name1", options=files), io.Combo.Input("clip_name2", options=files),
                    io.Combo.Input("type", options=["flux"])],
            outputs=[io.Clip.Output()])

    @classmethod
    def execute(cls, clip_name1, clip_name2, type):
        import comfy.sd
        import comfy.utils
        import folder_paths
        from checkpoints import TINY_CLIP, TINY_T5

        sds = [comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("text_encoders", name), safe_load=True)
               for name in (clip_name1, clip_name2)]
        # CLIP-L's config goes in as "model_config": for every CLIP file ComfyUI replaces "clip_l_model_config" with
        # that dict plus the file's position count (comfy/text_encoders/long_clipl.py, which also writes into it)
        clip = comfy.sd.load_text_encoder_state_dicts(
            sds, embedding_directory=folder_paths.get_folder_paths("embeddings"), clip_type=comfy.sd.CLIPType.FLUX,
            model_options={"model_config": dict(TINY_CLIP), "t5xxl_model_config": TINY_T5})
        return io.NodeOutput(clip)


class TinyTextEncoder(io.ComfyNode):
    """CLIPLoader (type qwen_image) for a small file: the same ComfyUI function as the stock node
    (``load_text_encoder_state_dicts``, which detects Qwen2.5-VL 7B from the file's keys), plus ComfyUI's
    per-encoder config override for its one layer (the stock node builds all 28 from ComfyUI's config class)."""

    @classmethod
    def define_schema(cls):
        import folder_paths

        return io.Schema(
            node_id="SDNTest_TinyTextEncoder", category="_for_testing",
            inputs=[io.Combo.Input("clip_name", options=folder_paths.get_filename_list("text_encoders")),
                    io.Combo.Input("type", options=["qwen_image"])],
            outputs=[io.Clip.Output()])

    @classmethod
    def execute(cls, clip_name, type):
        import comfy.sd
        import comfy.utils
        import folder_paths
        from checkpoints import QWEN_IMAGE_TE

        path = folder_paths.get_full_path_or_raise("text_encoders", clip_name)
        sd = comfy.utils.load_torch_file(path, safe_load=True)
        clip = comfy.sd.load_text_encoder_state_dicts(
            [sd], embedding_directory=folder_paths.get_folder_paths("embeddings"),
            clip_type=comfy.sd.CLIPType.QWEN_IMAGE, model_options={"qwen25_7b_model_config": dict(QWEN_IMAGE_TE)})
        return io.NodeOutput(clip)


class TestExtension(ComfyExtension):
    async def get_node_list(self):
        return [TinyCheckpoint, TinyTextEncoders, TinyTextEncoder]


async def comfy_entrypoint():
    return TestExtension()

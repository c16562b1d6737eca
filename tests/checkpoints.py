"""Real-architecture models with random weights, for graphs that go through ComfyUI's own loaders.

- ``random_vae()``: comfy.sd.VAE around the SD VAE architecture (AutoencoderKL, ch 128, mult 1-2-4-4).
- ``random_clip(kind)``: comfy.sd.CLIP of the SD1.5 (CLIP-L) or SDXL (CLIP-L + CLIP-G) text encoders, with
  ComfyUI's bundled tokenizers.
- ``write_random_checkpoint(path, kind="sd15")``: a full-size single-file checkpoint (UNet + CLIP + VAE)
  written by ComfyUI's own ``comfy.sd.save_checkpoint``, so the stock CheckpointLoaderSimple detects it as it
  would a real SD1.5 file. Weights are scaled Gaussian noise (the loader never sees real weights here).
"""
import torch

from models import init_weights_

SD_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                   "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def random_vae(seed=0):
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ae = AutoencoderKL(ddconfig=SD_VAE_DDCONFIG, embed_dim=4)
    init_weights_(ae, seed=seed, scale=0.02)
    return comfy.sd.VAE(sd=ae.state_dict())


def random_clip(kind="sd15", seed=0):
    import comfy.sd
    import comfy.supported_models as sm

    cfg = sm.SD15({}) if kind == "sd15" else sm.SDXL({"adm_in_channels": 2816})
    clip = comfy.sd.CLIP(target=cfg.clip_target(), embedding_directory=None)
    init_weights_(clip.cond_stage_model, seed=seed, scale=0.02)
    return clip


SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def write_random_checkpoint(path, kind="sd15", seed=0):
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models as sm

    if kind != "sd15":
        raise ValueError("only the SD1.5 full-size checkpoint is needed by the tests")
    cfg = sm.SD15(dict(SD15_UNET))
    model = cfg.get_model({}, device=torch.device("cpu"))
    init_weights_(model.diffusion_model, seed=seed, scale=0.02)
    mp = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    comfy.sd.save_checkpoint(str(path), mp, clip=random_clip("sd15", seed), vae=random_vae(seed))
    return path


def install_random_weights(host, folder: str, name: str, shapes: dict, seed: int, bias_scale: float = 0.0) -> str:
    """Write a state dict of ``shapes`` (fp16; norm weights 1, biases N(0, bias_scale), others N(0, 0.02)) as
    ``models/<folder>/<name>`` of the test host, once per session; return ``name`` for the loader node."""
    from safetensors.torch import save_file

    path = host.base_directory / "models" / folder / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(seed)
        sd = {}
        for k, shape in shapes.items():
            if "norm" in k and k.endswith("weight"):
                t = torch.ones(shape)
            elif k.endswith("bias"):
                t = torch.randn(shape, generator=g) * bias_scale
            else:
                t = torch.randn(shape, generator=g) * 0.02
            sd[k] = t.half().contiguous()
        save_file(sd, str(path))
    return name

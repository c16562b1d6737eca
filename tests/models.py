"""Models of the real architectures with small widths and random weights, built through ComfyUI.

``small_unet("sd15")`` / ``small_unet("sdxl")`` keep the real block layout (SD1.5: attention in input 1,2,4,5,7,8,
middle, output 3..11, depth 1; SDXL: input 4,5 depth 2 and 7,8 depth 10, output 0..2 depth 10 and 3..5 depth 2)
with reduced channels so a sampling step takes milliseconds on a CPU.
"""
import torch


def init_weights_(module: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> None:
    """Fill every parameter deterministically (ComfyUI's ops leave torch.empty garbage)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name and p.ndim == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def small_unet(kind: str = "sd15", seed: int = 0, tiny: bool = True, context_dim: int = 64, scale: float = 0.02,
               dtype: torch.dtype = torch.float32, device: torch.device = torch.device("cpu")):
    """Return a ``comfy.model_patcher.ModelPatcher`` around a real-layout UNet with random weights.

    ``context_dim``: width of the text tokens cross-attention reads (768 for a real SD1.5 CLIP, 2048 SDXL).
    ``scale``: standard deviation of the weights; at 0.02 attention barely moves the output (near-uniform
    weights, small projections), 0.05 makes every attention layer visible in the sampled latents.
    ``tiny=False``: the full-size architecture. ``dtype``, ``device``: weights and compute (the load device).
    """
    import comfy.model_patcher
    import comfy.supported_models as sm

    if kind == "sd15":
        unet_config = {
            "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 32 if tiny else 320,
            "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
            "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
            "context_dim": context_dim if tiny else 768, "num_heads": 8, "num_head_channels": -1,
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            "dtype": dtype,
        }
        cfg = sm.SD15(unet_config)
    elif kind == "sdxl":
        unet_config = {
            "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
            "model_channels": 64 if tiny else 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
            "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
            "context_dim": context_dim if tiny else 2048, "num_head_channels": 64 if not tiny else 16,
            "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
            "dtype": dtype,
        }
        cfg = sm.SDXL(unet_config)
    else:
        raise ValueError(kind)
    model = cfg.get_model({}, device=torch.device("cpu"))
    init_weights_(model.diffusion_model, seed=seed, scale=scale)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def small_svd(seed: int = 0):
    """A ModelPatcher around Stable Video Diffusion's real layout (``SVD_img2vid``: spatial transformers with
    temporal attention and temporal res blocks), small widths, random weights."""
    import comfy.model_patcher
    import comfy.supported_models as sm

    unet_config = {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 768, "in_channels": 8, "model_channels": 32,
        "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
        "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 64, "num_heads": -1,
        "num_head_channels": 16, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "extra_ff_mix_layer": True, "use_spatial_context": True, "merge_strategy": "learned_with_images",
        "merge_factor": 0.0, "video_kernel_size": [3, 1, 1], "use_temporal_resblock": True,
        "use_temporal_attention": True, "disable_temporal_crossattention": False, "dtype": torch.float32,
    }
    model = sm.SVD_img2vid(unet_config).get_model({}, device=torch.device("cpu"))
    init_weights_(model.diffusion_model, seed=seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def small_flux(kind: str = "flux1", seed: int = 0, scale: float = 0.2, depth: int = 1, single: int = 1):
    """A ModelPatcher around a Flux-family DiT with its real block layout (``depth`` double-stream and ``single``
    single-stream blocks), width 64, 2 heads, random weights.

    ``kind``: "flux1" (Flux.1-dev: guidance embedding, 16-channel latent, patch 2), "schnell" (no guidance),
    "flux2" (Flux.2: 128-channel latent, patch 1, 4 RoPE axes, global modulation) or "chroma" (Chroma: its
    modulation approximator). Text tokens are 32 wide; Flux.1 also takes a 32-wide pooled vector.
    """
    import dataclasses

    import comfy.ldm.flux.model as flux
    import comfy.model_patcher
    import comfy.supported_models as sm

    common = {"hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": depth, "depth_single_blocks": single,
              "context_in_dim": 32, "theta": 10000, "dtype": torch.float32}
    if kind in ("flux1", "schnell"):
        config = {**common, "image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16,
                  "vec_in_dim": 32, "axes_dim": [8, 12, 12], "qkv_bias": True, "guidance_embed": kind == "flux1"}
        cls = sm.Flux if kind == "flux1" else sm.FluxSchnell
    elif kind == "flux2":
        config = {**common, "image_model": "flux2", "in_channels": 128, "patch_size": 1, "out_channels": 128,
                  "vec_in_dim": None, "axes_dim": [8, 8, 8, 8], "theta": 2000, "qkv_bias": False,
                  "guidance_embed": True, "global_modulation": True, "mlp_silu_act": True, "ops_bias": False}
        cls = sm.Flux2
    elif kind == "chroma":
        config = {**common, "image_model": "chroma", "in_channels": 64, "patch_size": 2, "out_channels": 64,
                  "axes_dim": [8, 12, 12], "qkv_bias": True, "in_dim": 64, "out_dim": 64, "hidden_dim": 64,
                  "n_layers": 1}
        cls = sm.Chroma
    else:
        raise ValueError(kind)
    if kind == "chroma":
        import comfy.ldm.chroma.model as chroma

        fields = {f.name for f in dataclasses.fields(chroma.ChromaParams)}  # current ComfyUI's fields
        config.update({k: v for k, v in {"txt_ids_dims": [], "vec_in_dim": None}.items() if k in fields})
    elif "txt_ids_dims" in {f.name for f in dataclasses.fields(flux.FluxParams)}:
        config["txt_ids_dims"] = [] if kind != "flux2" else [3]  # current ComfyUI's field, as its detection sets it
    model = cls(config).get_model({}, device=torch.device("cpu"))
    init_weights_(model.diffusion_model, seed=seed, scale=scale)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def small_qwen_image(seed: int = 0, scale: float = 0.2, layers: int = 1):
    """A ModelPatcher around Qwen-Image's DiT with its real block layout (``layers`` joint blocks, each with a
    text and an image stream), 2 heads of 16, random weights. Text tokens are 32 wide; latents are 5-D
    ``[B, 16, 1, H, W]`` (Wan 2.1's latent format), patch 2."""
    import comfy.model_patcher
    import comfy.supported_models as sm

    config = {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16,
              "num_layers": layers, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
              "axes_dims_rope": (4, 6, 6), "dtype": torch.float32}
    model = sm.QwenImage(config).get_model({}, device=torch.device("cpu"))
    init_weights_(model.diffusion_model, seed=seed, scale=scale)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def small_nextdit(kind: str = "lumina2", seed: int = 0, scale: float = 0.2, layers: int = 1):
    """A ModelPatcher around NextDiT with its real block layout: one context refiner (text only), one noise
    refiner (image only), ``layers`` main blocks over [text, image]; 2 heads, random weights.

    ``kind``: "lumina2" (grouped-query attention: 1 key/value head) or "zimage" (Z-Image: its modulation, which
    needs a width of at least 256, 2 heads of 128 with its RoPE axes; text and image tokens padded to multiples of
    32). Text tokens are 32 wide; latents 16 channels, patch 2.
    """
    import comfy.model_patcher
    import comfy.supported_models as sm

    config = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "n_layers": layers,
              "n_refiner_layers": 1, "n_heads": 2, "qk_norm": True, "cap_feat_dim": 32, "axes_dims": [8, 12, 12],
              "axes_lens": [300, 512, 512], "multiple_of": 16, "dtype": torch.float32}
    if kind == "lumina2":
        config.update(n_kv_heads=1, ffn_dim_multiplier=4.0)
        cls = sm.Lumina2
    elif kind == "zimage":
        config.update(dim=256, n_kv_heads=2, axes_dims=[32, 48, 48], ffn_dim_multiplier=8.0 / 3.0, rope_theta=256.0,
                      z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32)
        cls = sm.ZImage
    else:
        raise ValueError(kind)
    model = cls(config).get_model({}, device=torch.device("cpu"))
    init_weights_(model.diffusion_model, seed=seed, scale=scale)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def small_sd3(kind: str = "sd3", seed: int = 0, scale: float = 0.2, layers: int = 2):
    """A ModelPatcher around SD3's MMDiT with its real block layout (``layers`` joint blocks over [context, x]; the
    last one's context stream is pre-only), 2 heads of 64 (MMDiT's width is 64 x heads), random weights.

    ``kind``: "sd3" (SD3 Medium / SD3.5 Large: MMDiT) or "sd35" (SD3.5 Medium: MMDiT-X, RMS q/k norms and an
    image-only attn2 in the earlier half of the blocks). Text tokens and the pooled vector are 32 wide; latents 16
    channels, patch 2.
    """
    import comfy.model_patcher
    import comfy.supported_models as sm

    config = {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "num_blocks": layers,
              "input_size": None, "adm_in_channels": 32, "pos_embed_max_size": 16, "num_patches": 256,
              "context_embedder_config": {"target": "torch.nn.Linear",
                                          "params": {"in_features": 32, "out_features": 128}},
              "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [], "dtype": torch.float32}
    if kind == "sd35":
        config.update(qk_norm="rms", x_block_self_attn_layers=list(range((layers + 1) // 2)))
    elif kind != "sd3":
        raise ValueError(kind)
    model = sm.SD3(config).get_model({}, device=torch.device("cpu"))
    init_weights_(model.diffusion_model, seed=seed, scale=scale)
    with torch.no_grad():  # a checkpoint's position table, a buffer (init_weights_ fills parameters)
        model.diffusion_model.pos_embed.copy_(torch.randn(1, 256, 128, generator=torch.Generator().manual_seed(seed)))
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def small_hidream(seed: int = 0, scale: float = 0.2, double: int = 1, single: int = 1):
    """A ModelPatcher around HiDream's DiT with its real block layout (``double`` double-stream and ``single``
    single-stream blocks over [image, T5, llama, llama], mixture-of-experts feed-forwards: 4 routed, 2 active),
    2 heads of 32, random weights. T5 tokens are 32 wide, the llama hidden states ``[B, 2, L, 32]`` (2 layers),
    the pooled vector 32 wide; latents 16 channels, patch 2."""
    import comfy.model_patcher
    import comfy.supported_models as sm

    config = {"image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": double,
              "num_single_layers": single, "attention_head_dim": 32, "num_attention_heads": 2,
              "caption_channels": [32, 32], "text_emb_dim": 32, "num_routed_experts": 4, "num_activated_experts": 2,
              "axes_dims_rope": [8, 12, 12], "max_resolution": [64, 64],
              "llama_layers": [min(i, 1) for i in range(double + single)], "dtype": torch.float32}
    model = sm.HiDream(config).get_model({}, device=torch.device("cpu"))
    init_weights_(model.diffusion_model, seed=seed, scale=scale)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))

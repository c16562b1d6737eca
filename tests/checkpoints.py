"""Real-architecture models with random weights, for graphs that go through ComfyUI's own loaders.

- ``random_vae()``: comfy.sd.VAE around the SD VAE architecture (AutoencoderKL, ch 128, mult 1-2-4-4).
- ``random_clip(kind)``: comfy.sd.CLIP of the SD1.5 (CLIP-L) or SDXL (CLIP-L + CLIP-G) text encoders, with
  ComfyUI's bundled tokenizers.
- ``write_random_checkpoint(path, kind="sd15")``: a full-size single-file checkpoint (UNet + CLIP + VAE)
  written by ComfyUI's own ``comfy.sd.save_checkpoint``, so the stock CheckpointLoaderSimple detects it as it
  would a real SD1.5 file. Weights are scaled Gaussian noise (the loader never sees real weights here).
- ``tiny_text_encoder(family)``: comfy.sd.CLIP of the DiT text encoders (Flux.1, SD3, Chroma, Z-Image, Qwen-Image,
  Flux.2, Lumina2, HiDream) at small widths, with ComfyUI's bundled tokenizers or small tokenizer data written here.
- ``write_random_flux_files(host)``: the diffusion model, VAE and text-encoder files of a Flux.1-dev workflow
  for the stock UNETLoader / VAELoader and the test-only ``SDNTest_TinyTextEncoders``.
- ``write_random_qwen_image_files(host)``: the same for a Qwen-Image workflow (stock UNETLoader / VAELoader, the
  test-only ``SDNTest_TinyTextEncoder`` for its CLIPLoader).
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
    """Write a state dict of ``shapes`` (fp16; norm weights and RMSNorm scales and gains 1, biases N(0, bias_scale),
    others N(0, 0.02)) as ``models/<folder>/<name>`` of the test host, once per session; return ``name`` for the loader
    node."""
    from safetensors.torch import save_file

    path = host.base_directory / "models" / folder / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(seed)
        sd = {}
        for k, shape in shapes.items():
            t = torch.empty(shape, dtype=torch.float16)  # drawn in fp16: the files hold a billion values
            if ("norm" in k and k.endswith("weight")) or k.endswith((".scale", ".gamma")):
                sd[k] = t.fill_(1.0)
            else:
                sd[k] = t.normal_(0.0, bias_scale if k.endswith("bias") else 0.02, generator=g)
        save_file(sd, str(path))
    return name


# Small widths and depths for ComfyUI's text-encoder classes, passed as ``<model_name>_model_config`` model options
# (ComfyUI's own per-encoder override of the JSON config). Vocabularies stay real: ComfyUI's bundled tokenizers
# emit every id. CLIP and Qwen3 keep 3 layers because SD3's CLIP and Z-Image read the penultimate one; Qwen's
# head width (128) is fixed by ComfyUI's config class. SD3 concatenates CLIP and T5 tokens at width 4096, so its
# T5 keeps d_model 4096 (one narrow layer: the 32128 x 4096 embedding is most of it).
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
             "projection_dim": 32}
TINY_T5 = {"d_model": 32, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 2}
TINY_T5_SD3 = {"d_model": 4096, "d_ff": 32, "d_kv": 8, "num_heads": 2, "num_layers": 1}
TINY_QWEN = {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
             "num_key_value_heads": 1}
# Flux.2's Mistral keeps 30 layers: ComfyUI stacks the hidden states before layers 10 and 20 and after layer 30. Its
# vocabulary is the test's own tekken file (TEKKEN_*), so the embedding is that small. HiDream's Llama returns every
# layer; Lumina2's Gemma reads the penultimate one.
TINY_MISTRAL = {"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 30, "num_attention_heads": 1,
                "num_key_value_heads": 1}
TINY_LLAMA = {"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 1,
              "num_key_value_heads": 1}
TINY_GEMMA = {"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 1,
              "num_key_value_heads": 1}
# Mistral's tekken special tokens in their real order (ranks = ids): ComfyUI's Flux.2 tokenizer pads with 11
# (<pad>), starts with 1 (<s>) and its chat template uses [INST] and [SYSTEM_PROMPT] pairs.
TEKKEN_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                   "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]"]
GEMMA_VOCAB = 320  # the 256 byte-fallback pieces, 4 specials, a few merges
TEKKEN_MERGES = [b"th", b"the", b" t", b" th", b" the", b"an", b" a", b"in", b"er", b"on", b" s", b" o", b"or", b"ar"]
TEKKEN_VOCAB = 256 + len(TEKKEN_MERGES) + len(TEKKEN_SPECIALS)


def tiny_tekken() -> torch.Tensor:
    """A valid tekken vocabulary (the ``tekken_model`` tokenizer data that ships inside Flux.2's Mistral file), as
    the uint8 tensor a safetensors file gives: the 256 byte tokens, a few merges, the special tokens above."""
    import base64
    import json

    vocab = [bytes([i]) for i in range(256)] + TEKKEN_MERGES
    data = {"config": {"pattern": r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+",
                       "num_vocab_tokens": len(vocab), "default_vocab_size": len(vocab) + len(TEKKEN_SPECIALS),
                       "default_num_special_tokens": len(TEKKEN_SPECIALS)},
            "vocab": [{"rank": r, "token_bytes": base64.b64encode(b).decode()} for r, b in enumerate(vocab)],
            "special_tokens": [{"rank": r, "token_str": t, "is_control": True} for r, t in enumerate(TEKKEN_SPECIALS)]}
    return torch.frombuffer(bytearray(json.dumps(data).encode()), dtype=torch.uint8)


def _tekken_loader(data):
    """ComfyUI's ``load_mistral_tokenizer`` result for tekken ``data`` built with the installed transformers:
    0.3.75's loader calls the transformers 4 ``MistralConverter(vocab=...)``, which transformers 5 replaced by
    ``MistralConverter(vocab_file)`` (same tekken layout: specials first, then the byte-level BPE ranks)."""
    import tempfile
    from pathlib import Path

    from transformers.integrations.mistral import MistralConverter

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tekken.json"
        path.write_bytes(data.numpy().tobytes())
        tokenizer = MistralConverter(str(path)).converted()
    # transformers 4's LlamaTokenizerFast put <s> first by default; 0.3.75 reads its start token from that
    return {"tokenizer_object": tokenizer, "legacy": False, "bos_token": "<s>", "add_bos_token": True}


def tiny_gemma_spiece() -> torch.Tensor:
    """A small SentencePiece model with Gemma's special ids (pad 0, eos 1, bos 2, unk 3), trained here on a few
    lines, as the ``spiece_model`` tokenizer data of a Lumina2 Gemma file (needs ``sentencepiece``)."""
    import io

    import sentencepiece

    text = ["a small orange fox in the snow", "a tall knight in silver armor with a long blue cape",
            "a grey horse with a white mane near the old castle towers", "fishermen in yellow coats by the river"]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text * 8), model_writer=model,
                                             vocab_size=GEMMA_VOCAB, model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                                             byte_fallback=True, minloglevel=2)
    return torch.frombuffer(bytearray(model.getvalue()), dtype=torch.uint8)


def tiny_text_encoder(family: str, seed: int = 0):
    """A ``comfy.sd.CLIP`` with the text encoders and tokenizers ComfyUI uses for ``family`` (``flux``: CLIP-L +
    T5-XXL, ``sd3``: CLIP-L + CLIP-G + T5-XXL, ``chroma``: T5-XXL, ``z_image``: Qwen3, ``qwen_image``:
    Qwen2.5-VL, ``flux2``: Mistral with :func:`tiny_tekken`, ``lumina2``: Gemma 2 with :func:`tiny_gemma_spiece`,
    ``hidream``: CLIP-L + CLIP-G + T5-XXL + Llama 3.1), built from ComfyUI's own classes (the ones
    ``comfy.sd.load_text_encoder_state_dicts`` picks for that family) at the small sizes above, float32,
    deterministic random weights. Qwen2.5-VL's vision tower has a fixed full size in ComfyUI and only encodes
    images: it is left uninitialised (never touched, so never in memory) and text prompts never reach it."""
    from unittest import mock

    import comfy.sd
    import comfy.text_encoders.flux
    import comfy.text_encoders.hidream
    import comfy.text_encoders.lumina2
    import comfy.text_encoders.pixart_t5
    import comfy.text_encoders.qwen_image
    import comfy.text_encoders.sd3_clip
    import comfy.text_encoders.z_image
    from comfy.supported_models_base import ClipTarget

    targets = {
        "flux": (ClipTarget(comfy.text_encoders.flux.FluxTokenizer, comfy.text_encoders.flux.flux_clip()),
                 {"clip_l_model_config": TINY_CLIP, "t5xxl_model_config": TINY_T5}),
        "sd3": (ClipTarget(comfy.text_encoders.sd3_clip.SD3Tokenizer, comfy.text_encoders.sd3_clip.sd3_clip()),
                {"clip_l_model_config": TINY_CLIP, "clip_g_model_config": TINY_CLIP,
                 "t5xxl_model_config": TINY_T5_SD3}),
        "chroma": (ClipTarget(comfy.text_encoders.pixart_t5.PixArtTokenizer, comfy.text_encoders.pixart_t5.pixart_te()),
                   {"t5xxl_model_config": TINY_T5}),
        "z_image": (ClipTarget(comfy.text_encoders.z_image.ZImageTokenizer, comfy.text_encoders.z_image.te()),
                    {"qwen3_4b_model_config": TINY_QWEN}),
        "qwen_image": (ClipTarget(comfy.text_encoders.qwen_image.QwenImageTokenizer, comfy.text_encoders.qwen_image.te()),
                       {"qwen25_7b_model_config": TINY_QWEN}),
        "flux2": (ClipTarget(comfy.text_encoders.flux.Flux2Tokenizer, comfy.text_encoders.flux.flux2_te()),
                  {"mistral3_24b_model_config": {**TINY_MISTRAL, "vocab_size": TEKKEN_VOCAB}}),
        "lumina2": (ClipTarget(comfy.text_encoders.lumina2.LuminaTokenizer, comfy.text_encoders.lumina2.te()),
                    {"gemma2_2b_model_config": {**TINY_GEMMA, "vocab_size": GEMMA_VOCAB}}),
        "hidream": (ClipTarget(comfy.text_encoders.hidream.HiDreamTokenizer,
                               comfy.text_encoders.hidream.hidream_clip()),
                    {"clip_l_model_config": TINY_CLIP, "clip_g_model_config": TINY_CLIP, "t5xxl_model_config": TINY_T5,
                     "llama_model_config": TINY_LLAMA}),
    }
    target, configs = targets[family]
    data = {"flux2": lambda: {"tekken_model": tiny_tekken()},
            "lumina2": lambda: {"spiece_model": tiny_gemma_spiece()}}.get(family, dict)()
    loader = comfy.text_encoders.flux.load_mistral_tokenizer
    try:
        if family == "flux2":
            loader(data["tekken_model"])
    except TypeError:  # ComfyUI 0.3.75 with transformers 5, see _tekken_loader
        loader = _tekken_loader
    with mock.patch.object(comfy.text_encoders.flux, "load_mistral_tokenizer", loader):
        clip = comfy.sd.CLIP(target=target, tokenizer_data=data, model_options={"dtype": torch.float32, **configs})
    model = clip.cond_stage_model
    init_weights_(model.qwen25_7b.transformer.model if family == "qwen_image" else model, seed=seed)
    return clip


# Flux.1 as ComfyUI 0.3.75's model detection reads it from a diffusion-model file: it fixes 24 heads and RoPE axes
# (16, 56, 56), so the width must stay 3072 (head width 128); depth, text width and pooled width come from the
# file's shapes and can be small. Current ComfyUI derives the heads from the width (width // 128), same result.
FLUX_STOCK_UNET = {"in_channels": 16, "out_channels": 16, "vec_in_dim": TINY_CLIP["hidden_size"], "context_in_dim": TINY_T5["d_model"],
                   "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 1, "depth_single_blocks": 1,
                   "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
FLUX_FILES = {"unet": ("diffusion_models", "sdn-random-flux1-dev.safetensors"),
              "vae": ("vae", "sdn-random-flux-ae.safetensors"),
              "clip_l": ("text_encoders", "sdn-tiny-clip_l.safetensors"),
              "t5xxl": ("text_encoders", "sdn-tiny-t5xxl.safetensors")}


def write_random_flux_files(host, seed: int = 0) -> dict:
    """Write, once per session, the files of a Flux.1-dev workflow into the host's model folders, in the real
    files' key formats: the diffusion model for the stock UNETLoader (``FLUX_STOCK_UNET``: full width, one
    double and one single block, about 0.5 B parameters, 1 GB fp16), the Flux VAE for the stock VAELoader (the
    real architecture: 16 latent channels, width 128, 84 M parameters), and small CLIP-L and T5-XXL files (widths
    ``TINY_CLIP`` / ``TINY_T5``) for ``SDNTest_TinyTextEncoders`` (the stock DualCLIPLoader builds both encoders
    at full size from ComfyUI's bundled JSON configs, 4.9 B parameters, whatever the file holds).
    Returns ``{"unet" | "vae" | "clip_l" | "t5xxl": file name}`` for the loader nodes."""
    import dataclasses

    import comfy.ldm.flux.model as flux
    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencodingEngine
    from safetensors.torch import save_file

    params = {f.name for f in dataclasses.fields(flux.FluxParams)}
    unet = dict(FLUX_STOCK_UNET, **({"txt_ids_dims": []} if "txt_ids_dims" in params else {}))  # current ComfyUI
    with torch.device("meta"):
        unet_shapes = {k: v.shape for k, v in flux.Flux(operations=comfy.ops.disable_weight_init, **unet).state_dict().items()}
        ddconfig = dict(SD_VAE_DDCONFIG, z_channels=16)
        vae = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})
        vae_shapes = {k: v.shape for k, v in vae.state_dict().items()}
    names = {"unet": install_random_weights(host, *FLUX_FILES["unet"], unet_shapes, seed=seed),
             "vae": install_random_weights(host, *FLUX_FILES["vae"], vae_shapes, seed=seed)}
    encoders = tiny_text_encoder("flux", seed=seed).cond_stage_model
    for key in ("clip_l", "t5xxl"):
        folder, name = FLUX_FILES[key]
        path = host.base_directory / "models" / folder / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            sd = getattr(encoders, key).transformer.state_dict()
            save_file({k: v.half().contiguous() for k, v in sd.items()}, str(path))
        names[key] = name
    return names


# Qwen-Image as ComfyUI 0.3.75's model detection reads it from a diffusion-model file: only the input channels and
# the block count come from the file; the width (24 heads of 128 = 3072), the text width (3584, Qwen2.5-VL 7B's)
# and the RoPE axes are the class defaults. Two joint blocks, so that the default dit_blocks (the later half) has
# one. Its text encoder must then emit 3584-wide tokens: Qwen2.5-VL at full width and vocabulary (the embedding
# is most of it), one layer, 4 key/value heads (ComfyUI tells the 7B from the 3B by the key bias width, 4 x 128).
QWEN_IMAGE_LAYERS = 2
QWEN_IMAGE_TE = {"hidden_size": 3584, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                 "num_key_value_heads": 4}
WAN_VAE_DIM = 32  # Wan 2.1 VAE width, read from the file by ComfyUI (the real one: 96)
QWEN_IMAGE_FILES = {"unet": ("diffusion_models", "sdn-random-qwen-image.safetensors"),
                    "vae": ("vae", "sdn-random-qwen-image-vae.safetensors"),
                    "clip": ("text_encoders", "sdn-tiny-qwen25-vl-7b.safetensors")}


def write_random_qwen_image_files(host, seed: int = 0) -> dict:
    """Write, once per session, the files of a Qwen-Image workflow into the host's model folders, in the real
    files' key formats: the diffusion model for the stock UNETLoader (full width, ``QWEN_IMAGE_LAYERS`` joint
    blocks, 0.72 B parameters, 1.4 GB fp16), the Wan 2.1 VAE for the stock VAELoader (real architecture at width
    ``WAN_VAE_DIM``), and the text side of Qwen2.5-VL 7B (``QWEN_IMAGE_TE``: 0.55 B parameters; no vision
    tower, which only encodes images) for ``SDNTest_TinyTextEncoder`` (the stock CLIPLoader builds all 28 layers
    from ComfyUI's config class, 7 B parameters, whatever the file holds).
    Returns ``{"unet" | "vae" | "clip": file name}`` for the loader nodes."""
    import comfy.ldm.qwen_image.model as qwen_image
    import comfy.ldm.wan.vae as wan_vae
    import comfy.ops
    import comfy.text_encoders.llama as llama

    ops = comfy.ops.disable_weight_init
    with torch.device("meta"):
        unet = qwen_image.QwenImageTransformer2DModel(num_layers=QWEN_IMAGE_LAYERS, operations=ops).state_dict()
        vae = wan_vae.WanVAE(dim=WAN_VAE_DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                             temperal_downsample=[False, True, True], dropout=0.0).state_dict()
        te = llama.Qwen25_7BVLI(dict(QWEN_IMAGE_TE), None, None, ops).state_dict()
    shapes = {"unet": unet, "vae": vae, "clip": {k: v for k, v in te.items() if k.startswith("model.")}}
    return {key: install_random_weights(host, *QWEN_IMAGE_FILES[key], {k: v.shape for k, v in sd.items()}, seed=seed)
            for key, sd in shapes.items()}

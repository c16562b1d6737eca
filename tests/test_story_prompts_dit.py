"""SDN_StoryPrompt's per-panel conditioning for the text encoders of DiT models (Flux.1, SD3, Chroma, Z-Image,
Qwen-Image, Flux.2, Lumina2, HiDream), with ComfyUI's own text-encoder classes at small widths and its bundled
tokenizers (or small tokenizer data written by tests/checkpoints.py).

The expectation for row i is computed here through a different path of ComfyUI: prompt i tokenized alone with
the encoder's own minimum-length option raised to the batch length (``<key>_min_length``, the tokenizer's
padding code), and CLIP chunks compared segment by segment against the empty prompt's encoding.
"""

import pytest
import torch

from checkpoints import tiny_text_encoder
from models import small_flux

EXACT = {"rtol": 0, "atol": 1e-5}
LONG = ("a tall knight in silver armor with a long blue cape, a scar over the left eye, short black hair, a round "
        "wooden shield painted with a red dragon, leather boots, a sword with a golden hilt, ") * 6  # > 256 T5
MID = ("a small brown dog wearing a green scarf and a red collar, crows circling above old castle towers at dusk, "
       "a grey horse with a white mane, a rolled map, a small lantern, a wooden cart full of apples, a narrow "
       "bridge over a river, fishermen in yellow coats, mist over the water, gulls on the roofs, a lighthouse far away, "
       "autumn leaves on the path")  # 2 CLIP chunks, 77-256 T5 tokens
SHORT = "a small orange fox"


def solo(clip, text, **min_lengths):
    """Prompt ``text`` alone, its chunk-free encoders padded by ComfyUI's tokenizer to ``min_lengths``."""
    options = {f"{key}_min_length": n for key, n in min_lengths.items()}
    return clip.encode_from_tokens(clip.tokenize(text, tokenizer_options=options), return_pooled=True,
                                   return_dict=True)


def lengths(clip, prompts, key):
    return [sum(len(chunk) for chunk in clip.tokenize(p)[key]) for p in prompts]


@pytest.fixture(scope="module")
def encode(pack):
    return pack("story.encode")


@pytest.fixture(scope="module")
def flux_clip(host):
    return tiny_text_encoder("flux", seed=1)


def test_flux_rows_are_each_prompt_alone_t5_padded(flux_clip, encode):
    """Flux.1: T5 lengths differ (one prompt past T5's 256-token minimum), CLIP chunk counts differ (1 vs 4 vs 2):
    one entry of the longest T5 length (no 77-token chunks), row i = prompt i alone with T5 padded by its own
    tokenizer, pooled CLIP-L vector per panel from the prompt's own first chunk."""
    clip = flux_clip
    prompts = [SHORT, LONG, MID]
    t5 = lengths(clip, prompts, "t5xxl")
    assert t5[0] == t5[2] == 256 and t5[1] > 256 and t5[1] % 77, t5
    assert [len(clip.tokenize(p)["l"]) for p in prompts] == [1, 4, 2]
    [[cond, extras]] = encode.encode_panels(clip, prompts)
    assert cond.shape == (3, t5[1], 32)
    assert set(extras) == {"pooled_output"} and extras["pooled_output"].shape == (3, 32)
    for i, p in enumerate(prompts):
        alone = solo(clip, p, t5xxl=t5[1])
        torch.testing.assert_close(cond[i:i + 1], alone["cond"], **EXACT)
        torch.testing.assert_close(extras["pooled_output"][i:i + 1], alone["pooled_output"], **EXACT)
    # the padding is T5's pad token, not a repeat or zeros, and panels differ
    assert (cond[0] - cond[2]).abs().max() > 1e-3
    # all prompts under 256 T5 tokens: exactly ComfyUI's own encodings, no padding at all
    [[cond2, extras2]] = encode.encode_panels(clip, [SHORT, MID])
    for i, p in enumerate([SHORT, MID]):
        alone = solo(clip, p)
        torch.testing.assert_close(cond2[i:i + 1], alone["cond"], rtol=0, atol=0)
        torch.testing.assert_close(extras2["pooled_output"][i:i + 1], alone["pooled_output"], rtol=0, atol=0)


def _flux_model():
    return small_flux("flux1", seed=3, scale=0.05)  # Flux.1's real block layout, context and pooled width 32


def _sample(model, positive, negative, rows, cfg=1.0):
    """The stock sampler, 2 steps, on rows ``rows`` of a fixed noise batch (so each image can be drawn alone)."""
    import comfy.sample

    noise = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(5))[rows]
    return comfy.sample.sample(model, noise, 2, cfg, "euler", "simple", positive, negative, torch.zeros_like(noise),
                               seed=5, disable_pbar=True)


def test_flux_guidance_applies_per_panel_through_the_sampler(host, flux_clip, encode):
    """The story positive through the stock FluxGuidance node and the stock sampler on a small Flux.1 model
    (cfg 1, as Flux.1-dev runs): image i equals sampling panel i alone with its own row and the same guidance,
    and the guidance value reaches the model."""
    guidance = host.nodes.NODE_CLASS_MAPPINGS["FluxGuidance"]
    model = _flux_model()
    positive, negative = encode.encode_panels(flux_clip, [LONG, SHORT]), encode.encode_negative(flux_clip, "", "none")

    def guided(cond, g):
        return guidance.execute(cond, g).result[0]

    batch = _sample(model, guided(positive, 2.0), negative, [0, 1])
    [[cond, extras]] = positive
    for i in range(2):
        row = [[cond[i:i + 1], {k: v[i:i + 1] for k, v in extras.items()}]]
        torch.testing.assert_close(batch[i:i + 1], _sample(model, guided(row, 2.0), negative, [i]), atol=2e-4,
                                   rtol=2e-4)
    assert (batch - _sample(model, guided(positive, 6.0), negative, [0, 1])).abs().max() > 1e-4


def _chroma_model():
    return small_flux("chroma", seed=4, scale=0.05)


def test_chroma_t5_only_rows_and_sampling(host, encode):
    """Chroma: T5 alone, no minimum length (ComfyUI pads nothing), no pooled vector. Rows = prompt alone padded
    with T5's pad token to the longest; the entries keep ``pooled_output: None`` as CLIPTextEncode does, which
    Chroma's model reads: the story samples through the stock sampler with cfg, each image as if alone."""
    clip = tiny_text_encoder("chroma", seed=2)
    prompts = [SHORT, MID]
    t5 = lengths(clip, prompts, "t5xxl")
    assert t5[0] < t5[1], t5
    positive, negative = encode.encode_panels(clip, prompts), encode.encode_negative(clip, "blurry", "none")
    [[cond, extras]] = positive
    assert cond.shape == (2, t5[1], 32) and extras == {"pooled_output": None}
    assert "pooled_output" in negative[0][1] and negative[0][0].shape[0] == 1
    for i, p in enumerate(prompts):
        torch.testing.assert_close(cond[i:i + 1], solo(clip, p, t5xxl=t5[1])["cond"], **EXACT)
    model = _chroma_model()
    batch = _sample(model, positive, negative, [0, 1], cfg=3.0)
    assert not torch.isnan(batch).any()
    alone = _sample(model, [[cond[1:2], {"pooled_output": None}]], negative, [1], cfg=3.0)
    torch.testing.assert_close(batch[1:2], alone, atol=2e-4, rtol=2e-4)


def test_sd3_clip_chunks_and_t5_padded_each_by_its_own_rule(host, encode):
    """SD3: CLIP-L and CLIP-G in 77-token chunks (2 vs 1) followed by T5 tokens (77 minimum; 1 prompt longer):
    each part padded by its own tokenizer, compared segment by segment with the prompts encoded alone."""
    clip = tiny_text_encoder("sd3", seed=3)
    prompts = [MID, SHORT]
    t5 = lengths(clip, prompts, "t5xxl")
    assert t5[0] > 77 and t5[1] == 77, t5
    assert [len(clip.tokenize(p)["l"]) for p in prompts] == [2, 1]
    [[cond, extras]] = encode.encode_panels(clip, prompts)
    assert cond.shape == (2, 154 + t5[0], 4096)
    long_alone, short_alone = solo(clip, prompts[0]), solo(clip, prompts[1], t5xxl=t5[0])
    empty = solo(clip, "")
    torch.testing.assert_close(cond[0:1], long_alone["cond"], **EXACT)
    torch.testing.assert_close(cond[1:2, :77], short_alone["cond"][:, :77], **EXACT)  # its own CLIP chunk
    torch.testing.assert_close(cond[1:2, 77:154], empty["cond"][:, :77], **EXACT)  # an empty CLIP chunk
    torch.testing.assert_close(cond[1:2, 154:], short_alone["cond"][:, 77:], **EXACT)  # T5, padded by T5
    assert (cond[1, 77:154] - cond[1, :77]).abs().max() > 1e-3
    assert extras["pooled_output"].shape == (2, 64)
    torch.testing.assert_close(extras["pooled_output"][1:2], short_alone["pooled_output"], **EXACT)


@pytest.mark.parametrize("family,key", [("z_image", "qwen3_4b"), ("qwen_image", "qwen25_7b")])
def test_llm_encoders_rows_and_attention_masks(host, encode, family, key):
    """Z-Image (Qwen3) and Qwen-Image (Qwen2.5-VL): one sequence per prompt inside the model's chat template,
    padded on the right with the Qwen pad token; the attention mask marks the padding per panel (Qwen-Image
    drops a mask without padding: the longest panel gets all ones)."""
    clip = tiny_text_encoder(family, seed=4)
    prompts = [SHORT, MID, "a fox"]
    n = lengths(clip, prompts, key)
    assert len(set(n)) == 3, n
    [[cond, extras]] = encode.encode_panels(clip, prompts)
    mask = extras["attention_mask"]
    assert mask.shape == cond.shape[:2] and cond.shape[0] == 3
    for i, p in enumerate(prompts):
        alone = solo(clip, p, **{key: max(n)})
        torch.testing.assert_close(cond[i:i + 1], alone["cond"], **EXACT)
        own = solo(clip, p)
        assert int(mask[i].sum()) == own["cond"].shape[1], "mask counts the prompt's own tokens"
        if "attention_mask" in alone:
            torch.testing.assert_close(mask[i:i + 1], alone["attention_mask"].to(mask))
    assert mask[1].all() and not mask[0].all() and not mask[2].all()


def test_unknown_tokenizer_with_unequal_lengths_is_refused(host, pack, encode):
    """A tokenizer that is not ComfyUI's SDTokenizer kind cannot be padded by its rules: a clear error."""
    clip = tiny_text_encoder("chroma", seed=5).clone()

    class Opaque:
        def __init__(self, inner):
            self.inner = inner

        def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
            return self.inner.tokenize_with_weights(text, return_word_ids, **kwargs)

    clip.tokenizer = Opaque(clip.tokenizer)
    with pytest.raises(pack("errors").UnsupportedModelError, match="SDN_StoryPrompt: .*'t5xxl'.*SDTokenizer"):
        encode.encode_panels(clip, [SHORT, MID])
    [[cond, _]] = encode.encode_panels(clip, [SHORT, SHORT])  # equal lengths need no padding
    assert cond.shape[0] == 2


def test_flux_files_load_through_the_stock_loaders(host, flux_files):
    """The files of a Flux.1-dev workflow (tests/checkpoints.py) through ComfyUI's executor: the stock UNETLoader
    detects Flux.1-dev from the keys and shapes and keeps the file's depth and text widths, the stock VAELoader
    gives a 16-channel Flux VAE, and SDN_StoryPrompt encodes a story with the CLIP-L + T5-XXL pair."""
    from checkpoints import FLUX_STOCK_UNET, TINY_T5

    import comfy.supported_models as sm

    files = flux_files
    story = "[Fox] a small orange fox\n---\n[Fox] in the snow\n[Fox] " + LONG
    run = host.run({
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": files["unet"], "weight_dtype": "default"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": files["vae"]}},
        "3": {"class_type": "SDNTest_TinyTextEncoders",
              "inputs": {"clip_name1": files["clip_l"], "clip_name2": files["t5xxl"], "type": "flux"}},
        "4": {"class_type": "SDN_StoryPrompt",
              "inputs": {"clip": ["3", 0], "story": story, "style": "none", "negative": ""}},
        **{str(n): {"class_type": "PreviewAny", "inputs": {"source": src}}
           for n, src in ((5, ["1", 0]), (6, ["2", 0]), (7, ["4", 2]))},
    })
    model = run.node_output("1", 0).model
    assert type(model.model_config) is sm.Flux  # guidance_embed in the keys: dev, not schnell
    config = model.model_config.unet_config
    assert {k: config[k] for k in ("hidden_size", "depth", "depth_single_blocks", "context_in_dim", "vec_in_dim")} \
        == {k: FLUX_STOCK_UNET[k] for k in ("hidden_size", "depth", "depth_single_blocks", "context_in_dim", "vec_in_dim")}
    assert len(model.diffusion_model.double_blocks) == 1 and len(model.diffusion_model.single_blocks) == 1
    vae = run.node_output("2", 0)
    assert vae.latent_channels == 16
    assert run.node_output("4", 2) == 2
    [[cond, extras]] = run.node_output("4", 0)
    assert cond.shape[0] == 2 and cond.shape[1] > 256 and cond.shape[2] == TINY_T5["d_model"]
    assert extras["pooled_output"].shape == (2, FLUX_STOCK_UNET["vec_in_dim"])


def test_flux2_mistral_panels_padded_with_zeros_in_front_as_its_model_pads(host, encode):
    """Flux.2 (Mistral, a tekken vocabulary written by the test): ComfyUI's tokenizer pads on the LEFT with <pad>
    (11), which its encoder does not mask and which shifts the prompt to later positions, so a left-padded prompt
    encodes differently. The story pads the encoder output instead, with zeros in front: row i is prompt i's own
    encoding after zeros, and Flux.2's model, which puts zeros in front of any text shorter than 512 tokens, then
    sees for each panel exactly what it sees for that prompt alone."""
    clip = tiny_text_encoder("flux2", seed=6)
    prompts = [SHORT, MID, "a fox"]
    n = lengths(clip, prompts, "mistral3_24b")
    assert len(set(n)) == 3 and max(n) < 512, n
    [[cond, extras]] = encode.encode_panels(clip, prompts)
    length = max(n)
    assert cond.shape == (3, length, 3 * 32) and extras["attention_mask"].shape == (3, length)
    model = small_flux("flux2").model
    for i, p in enumerate(prompts):
        alone = solo(clip, p)["cond"]
        front = length - n[i]
        torch.testing.assert_close(cond[i:i + 1, front:], alone, **EXACT)
        assert not cond[i, :front].any() and extras["attention_mask"][i].tolist() == [0] * front + [1] * n[i]
        seen = [model.extra_conds(cross_attn=c, pooled_output=None)["c_crossattn"].cond for c in (cond[i:i + 1], alone)]
        torch.testing.assert_close(seen[0], seen[1], **EXACT)
        if front:  # why not the tokenizer's own left padding: it changes the prompt's encoding
            padded = solo(clip, p, mistral3_24b=length)["cond"]
            assert (padded[:, front:] - alone).abs().max() > 1e-3


def test_lumina2_gemma_rows_and_attention_masks(host, encode):
    """Lumina2 (Gemma 2 with a SentencePiece model trained by the test): padded on the right with Gemma's pad
    token, masked per panel; row i = prompt i alone with the minimum length raised to the longest panel."""
    pytest.importorskip("sentencepiece", reason="ComfyUI's Gemma tokenizer needs sentencepiece "
                                                "(tests/requirements-host.txt)")
    clip = tiny_text_encoder("lumina2", seed=7)
    prompts = [SHORT, MID, "a fox"]
    n = lengths(clip, prompts, "gemma2_2b")
    assert len(set(n)) == 3, n
    [[cond, extras]] = encode.encode_panels(clip, prompts)
    mask = extras["attention_mask"]
    assert cond.shape == (3, max(n), 32) and mask.shape == (3, max(n))
    for i, p in enumerate(prompts):
        alone = solo(clip, p, gemma2_2b=max(n))
        torch.testing.assert_close(cond[i:i + 1], alone["cond"], **EXACT)
        torch.testing.assert_close(mask[i:i + 1], alone["attention_mask"].to(mask))
        assert mask[i].tolist() == [1] * n[i] + [0] * (max(n) - n[i])


def test_hidream_four_encoders_rows_pooled_and_llama_extra(host, encode):
    """HiDream (CLIP-L + CLIP-G + T5-XXL + Llama 3.1): T5 fixed at 128 tokens, Llama padded on the right to the
    longest panel (one prompt past its 128 minimum), CLIP chunk counts differing (only the pooled vectors of the
    first chunk are used): cond, pooled_output and conditioning_llama3 stacked per panel, row i = prompt i alone."""
    clip = tiny_text_encoder("hidream", seed=8)
    prompts = [SHORT, LONG]
    n = lengths(clip, prompts, "llama")
    assert n[0] == 128 < n[1], n
    [[cond, extras]] = encode.encode_panels(clip, prompts)
    assert set(extras) == {"pooled_output", "conditioning_llama3"}
    assert cond.shape == (2, 128, 32) and extras["pooled_output"].shape == (2, 64)
    assert extras["conditioning_llama3"].shape == (2, 2, n[1], 32)  # layers after the embedding
    for i, p in enumerate(prompts):
        alone = solo(clip, p, llama=n[1])
        torch.testing.assert_close(cond[i:i + 1], alone["cond"], **EXACT)
        for key in extras:
            torch.testing.assert_close(extras[key][i:i + 1], alone[key], **EXACT)

"""SDN_StoryPrompt through ComfyUI's executor, with a real SD1.5 CLIP-L text encoder (random weights) loaded by the
core CLIPLoader (type stable_diffusion, ComfyUI's bundled SD1 tokenizer).

Expectations are computed here by encoding each hand-expanded panel prompt alone with the same CLIP.
"""
import re

import pytest
import torch

from checkpoints import install_random_weights

CLIP_NAME = "sdn_story_test_clip_l.safetensors"

# about 90 CLIP tokens: 2 chunks of 77 (CLIP-L on CPU costs about a second per chunk: keep chunks few)
HERO = ("a tall knight in silver armor with a long blue cape, a scar over the left eye, short black hair, "
        "a round wooden shield painted with a red dragon, leather boots, a sword with a golden hilt, "
        "carrying a small lantern and a rolled map, riding a grey horse with a white mane, "
        "followed by a small brown dog wearing a green scarf, crows circling above old castle towers")
FOX = "a small orange fox"
STORY = (f"// test story\n[Hero] {HERO}\n[Fox] {FOX}\n---\n"
         "[Hero] crossing a bridge\n"
         "[NC] an empty forest clearing # zzz # at last\n")
# expanded by hand, independently of the parser; only the text after the LAST '#' is the caption
PANELS = [f"{HERO} crossing a bridge", "an empty forest clearing # zzz"]
CAPTIONS = "\nat last"


@pytest.fixture(scope="session")
def clip_file(host):
    """A CLIP-L (SD1.5 text encoder) state dict with deterministic, non-degenerate random weights, fp16.

    Written once per test session into the host's models/text_encoders.
    """
    import comfy.sd1_clip

    # shapes from ComfyUI's own CLIP-L definition; meta device: no memory, no (garbage) values
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in comfy.sd1_clip.SDClipModel(device="meta").transformer.state_dict().items()}
    return install_random_weights(host, "text_encoders", CLIP_NAME, shapes, seed=1234, bias_scale=0.01)


STYLE = "comic book"


def graph(story=STORY, negative="blurry, lowres"):
    return {
        "1": {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP_NAME, "type": "stable_diffusion"}},
        "2": {"class_type": "SDN_StoryPrompt",
              "inputs": {"clip": ["1", 0], "story": story, "style": STYLE, "negative": negative}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}},
    }


@pytest.fixture(scope="module")
def run(host, clip_file):
    return host.run(graph())


@pytest.fixture(scope="module")
def empty_chunk(run):
    return encode_alone(run.node_output("1", 0), "")[0]


def encode_alone(clip, text):
    out = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)
    return out["cond"], out["pooled_output"]


@pytest.fixture(scope="module")
def style(pack):
    template, negative = pack("story.styles").STYLES[STYLE]
    assert "{prompt}" in template and negative
    return template, negative


def test_positive_batch_padding_and_rows(run, empty_chunk, style):
    clip = run.node_output("1", 0)
    positive = run.node_output("2", 0)
    assert isinstance(positive, list) and len(positive) == 1, "one per-panel entry expected"
    cond, extras = positive[0]
    empty = empty_chunk
    solo = [encode_alone(clip, style[0].replace("{prompt}", p)) for p in PANELS]
    lengths = [c.shape[1] for c, _ in solo]
    assert lengths == [154, 77], lengths  # the long prompt really is long
    assert cond.shape == (2, 154, 768)
    for i, (c, pooled) in enumerate(solo):
        n = c.shape[1]
        torch.testing.assert_close(cond[i:i + 1, :n], c, rtol=0, atol=1e-5)
        for start in range(n, cond.shape[1], 77):  # padding = empty-prompt chunk encoding
            torch.testing.assert_close(cond[i:i + 1, start:start + 77], empty, rtol=0, atol=1e-5)
        torch.testing.assert_close(extras["pooled_output"][i], pooled.reshape(-1), rtol=0, atol=1e-5)
    assert extras["pooled_output"].shape == (2, 768)
    # non-degenerate encoder: panels differ, and the empty padding differs from a real chunk
    assert (cond[0, :77] - cond[1, :77]).abs().max() > 1e-2
    assert (cond[1, :77] - empty[0]).abs().max() > 1e-2
    assert not torch.isnan(cond).any()
    assert set(extras) <= {"pooled_output"}, set(extras)  # SD1 CLIP gives no attention mask by default


def test_negative_and_small_outputs(run, style):
    clip = run.node_output("1", 0)
    negative = run.node_output("2", 1)
    assert len(negative) == 1
    ncond, nextras = negative[0]
    exp, exp_pooled = encode_alone(clip, "blurry, lowres, " + style[1])
    assert ncond.shape[0] == 1
    torch.testing.assert_close(ncond, exp, rtol=0, atol=1e-5)
    torch.testing.assert_close(nextras["pooled_output"], exp_pooled, rtol=0, atol=1e-5)
    assert run.node_output("2", 2) == 2
    assert run.node_output("2", 3) == CAPTIONS
    story = run.node_output("2", 4)
    assert [p.prompt for p in story.panels] == PANELS
    assert story.panels_naming("Hero") == (0,) and story.panels_naming("Fox") == ()
    assert story.panels[1].no_character and story.style == STYLE


def test_malformed_story_error_through_executor(host, clip_file, caplog):
    import sdn_host
    caplog.clear()
    bad = f"[Fox] {FOX}\n---\n[Fox] runs\n[Wolf] howls\n"
    with pytest.raises(sdn_host.WorkflowError) as info:
        host.run(graph(story=bad))
    # ComfyUI forwards execution_error only to a connected client; it always logs the exception
    text = str(info.value) + "\n" + caplog.text
    assert re.search(r"SDN_StoryPrompt: input 'story': expected .*got line 4: unknown character '\[Wolf\]'", text), \
        text[-2000:]


def tiny_clip_with_masks(host):
    """A real ComfyUI CLIP (SD1 tokenizer, CLIPTextModel with 2 layers of width 32) built to also return
    attention masks, as some text encoders do: exercises how per-panel extras are padded and stacked."""
    import functools

    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    from models import init_weights_

    config = {"hidden_act": "quick_gelu", "hidden_size": 32, "intermediate_size": 64, "layer_norm_eps": 1e-5,
              "max_position_embeddings": 77, "num_attention_heads": 2, "num_hidden_layers": 2,
              "projection_dim": 32, "vocab_size": 49408, "eos_token_id": 49407}
    inner = functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=config, return_attention_masks=True,
                              return_projected_pooled=False)
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer,
                                                    functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=inner))
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    init_weights_(clip.cond_stage_model, seed=7)
    return clip


def test_extras_attention_mask_padded_per_panel(host, pack):
    enc = pack("story.encode")
    clip = tiny_clip_with_masks(host)
    prompts = ["word " * 100, "a cat", "a dog on a hill"]
    positive = enc.encode_panels(clip, prompts)
    assert len(positive) == 1
    cond, extras = positive[0]
    assert cond.shape == (3, 154, 32)
    solo = [clip.encode_from_tokens(clip.tokenize(p), return_pooled=True, return_dict=True) for p in prompts]
    empty = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True, return_dict=True)
    assert "attention_mask" in solo[0] and solo[0]["attention_mask"].shape == (1, 154)
    mask = extras["attention_mask"]
    assert mask.shape == (3, 154)
    torch.testing.assert_close(mask[0:1], solo[0]["attention_mask"])
    for i in (1, 2):
        torch.testing.assert_close(mask[i:i + 1, :77], solo[i]["attention_mask"])
        torch.testing.assert_close(mask[i:i + 1, 77:], empty["attention_mask"])
        torch.testing.assert_close(cond[i:i + 1, 77:], empty["cond"])
        torch.testing.assert_close(extras["pooled_output"][i], solo[i]["pooled_output"].reshape(-1))
    # masks differ between a short and a shorter prompt (so the check above is not vacuous)
    assert not torch.equal(mask[1], mask[2])

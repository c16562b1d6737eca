"""Character token spans of SDN_STORY panels: each equals the positions where the description's own tokens
(tokenized alone with the same tokenizer) occur in the panel's padded token list on the cond's token axis."""
import itertools

import pytest
import torch

from checkpoints import TINY_CLIP, init_weights_, tiny_text_encoder
from test_story_nodes import CLIP_NAME, HERO, clip_file  # noqa: F401  (fixture)

FOX = "a small orange fox"
# the Hero's ~90 tokens start after "comic book panel, a small orange fox and": they cross the 77-token chunk edge
STORY = (f"[Hero] {HERO}\n[Fox] {FOX}\n---\n"
         "[Fox] and [Hero] crossing a bridge with [Fox]\n"
         "[Fox] sleeping, night\n"
         "[NC] an empty forest clearing\n")


def found(clip, key, chunks, desc):
    """Positions (chunks laid end to end) of every occurrence of ``desc``'s tokens among the non-special tokens."""
    sub = getattr(clip.tokenizer, key, None) or getattr(clip.tokenizer, f"clip_{key}")
    special = {sub.start_token, sub.end_token, sub.pad_token}
    flat = [(item[0], pos) for pos, item in enumerate(itertools.chain(*chunks)) if item[0] not in special]
    d = [item[0] for item in itertools.chain(*clip.tokenize(desc)[key]) if item[0] not in special]
    out = set()
    for i in range(len(flat) - len(d) + 1):
        if [t for t, _ in flat[i:i + len(d)]] == d:
            out |= {pos for _, pos in flat[i:i + len(d)]}
    return out


def covered(spans):
    return {p for a, b in spans for p in range(a, b)}


def check(pack, clip, story, parts, style="comic book"):
    """``parts``: token-axis parts in order, each the tokenizer keys whose lists give its positions."""
    encode, parser = pack("story.encode"), pack("story.parser")
    parsed = parser.Story(**{**parser.parse_story(story).__dict__, "style": style})
    positive, _, out = encode.encode_story(clip, parsed, "")
    padded, _ = encode.pad_panel_tokens(clip, [clip.tokenize(t) for t in parsed.styled_prompts()])
    lengths = [sum(map(len, padded[0][p[0]])) for p in parts]
    assert positive[0][0].shape[1] == sum(lengths)
    for i, panel in enumerate(out.panels):
        assert set(panel.spans) == set(panel.characters)
        for name, spans in panel.spans.items():
            offset, expected = 0, set()
            for part, length in zip(parts, lengths):
                sets = [found(clip, k, padded[i][k], parsed.characters[name]) for k in part]
                assert sets[0] and all(s == sets[0] for s in sets)
                expected |= {offset + p for p in sets[0]}
                offset += length
            assert covered(spans) == expected, (i, name)
    return out


@pytest.fixture(scope="module")
def sd15(host, clip_file):  # noqa: F811
    return host.run({
        "1": {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP_NAME, "type": "stable_diffusion"}},
        "2": {"class_type": "SDN_StoryPrompt",
              "inputs": {"clip": ["1", 0], "story": STORY, "style": "comic book", "negative": ""}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}},
    })


def test_sd15_spans_through_the_executor(pack, sd15):
    story = sd15.node_output("2", 4)
    clip = sd15.node_output("1", 0)
    assert story.panels == check(pack, clip, STORY, (("l",),)).panels
    hero, fox = story.panels[0].spans["Hero"], story.panels[0].spans["Fox"]
    assert len(hero) == 2 and hero[0][1] == 76 and hero[1][0] == 78  # cut by the chunk edge: end + start tokens
    assert len(fox) == 2 and fox[0][0] == 5  # named twice; after <start> "comic book panel ,"
    assert story.panels[2].spans == {} and story.panels[1].spans.keys() == {"Fox"}


def test_sub_stories_keep_spans(pack, sd15):
    select = pack("story.select")
    story = sd15.node_output("2", 4)
    _, refs = select.select_panels(story, "references", "Fox", 1)
    assert refs.panels == (story.panels[1],) and refs.panels[0].spans
    assert select.sub_story(story, [story.panels[0]], carried=0).panels[0].spans == story.panels[0].spans


def test_parsed_story_has_no_spans(pack):
    assert all(p.spans == {} for p in pack("story.parser").parse_story(STORY).panels)


def test_sdxl_spans(host, pack):
    import comfy.sd
    import comfy.supported_models as sm

    clip = comfy.sd.CLIP(target=sm.SDXL({"adm_in_channels": 2816}).clip_target(),
                         model_options={"dtype": torch.float32, "clip_l_model_config": TINY_CLIP,
                                        "clip_g_model_config": TINY_CLIP})
    init_weights_(clip.cond_stage_model, seed=3)
    check(pack, clip, STORY, (("l", "g"),))


@pytest.mark.parametrize("family,parts", [("flux", (("t5xxl",),)), ("chroma", (("t5xxl",),)),
                                          ("sd3", (("l", "g"), ("t5xxl",)))])
def test_dit_spans(host, pack, family, parts):
    out = check(pack, tiny_text_encoder(family, seed=9), STORY, parts, style="none")
    if family == "sd3":  # both the CLIP part and the T5 part
        assert any(a >= 154 for a, _ in out.panels[0].spans["Fox"]) and out.panels[0].spans["Fox"][0][0] < 77


def test_llm_encoders_give_no_spans(host, pack):
    encode, parser = pack("story.encode"), pack("story.parser")
    _, _, out = encode.encode_story(tiny_text_encoder("qwen_image", seed=9), parser.parse_story(STORY), "")
    assert all(p.spans == {} for p in out.panels)

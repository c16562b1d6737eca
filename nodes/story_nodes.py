"""Story prompts and comic pages: SDN_StoryPrompt, SDN_ComicLayout; reference-mode panel bookkeeping:
SDN_StoryPanels, SDN_StoryBatches, SDN_MergePanels. Logic lives in ``story/``."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..errors import NodeInputError
from ..story.encode import encode_story
from ..story.bubbles import compose_comic
from ..story.layout import DIRECTIONS, LAYOUTS, LayoutSpec, split_captions
from ..story.parser import parse_story
from ..story.select import (PARTS, concat_conditioning, latent_layout, merge_panels, reference_rows, select_panels,
                            slice_conditioning, split_batches, sub_story)
from ..story.styles import STYLE_NAMES
from .types import STORY

DEFAULT_STORY = """\
// Characters first: [Name] description. Then '---', then one line per panel.
// [Name] in a panel is replaced by the description; [NC] = no character; text after the last # is the caption.
[Mia] a young woman with short red hair, green raincoat, yellow boots
[Otto] an old man with a white beard, brown tweed jacket, round glasses
---
[Mia] walking down a rainy city street at dawn # Mia was late again.
[Mia] looking up at a tall clock tower
[NC] a tiny bookshop with glowing windows on a narrow street # The shop was not on any map.
[Otto] behind a wooden counter, smiling, holding an old book
[Mia] and [Otto] sitting by a fireplace reading together # Some stories find their readers.
"""

DEFAULT_NEGATIVE = ("lowres, bad anatomy, bad hands, extra fingers, missing fingers, deformed, blurry, "
                    "watermark, text, signature, jpeg artifacts, worst quality")

STORY_TOOLTIP = (
    "Characters first, one per line: '[Name] description'. Then a line '---' (recommended; without it the "
    "character section ends at the first line that is not a new '[Name] description'). Then one line per panel: "
    "'[Name]' is replaced by that character's description (several per panel allowed), '[NC]' marks a panel "
    "without a character, text after the last '#' is the panel's caption. Lines starting with '>' are dialogue of "
    "the panel line above, drawn by Comic Layout as bubbles: '> Name: text' (speech), '> Name (thought): text', "
    "'(shout)', '(whisper)'; '> text' without a speaker is narration. Blank lines and lines starting with '//' are "
    "ignored.")


class StoryPrompt(io.ComfyNode):
    """Parse a story and encode one conditioning row per panel (StoryDiffusion's prompt syntax)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SDN_StoryPrompt",
            display_name="Story Prompt (StoryDiffusion)",
            category="StoryDiffusion/story",
            description="Turns a story (characters + one line per panel) into per-panel conditioning: one "
                        "conditioning entry whose batch row i is panel i, for a latent batch of panel_count images.",
            inputs=[
                io.Clip.Input("clip", tooltip="Text encoder (CLIP) of the checkpoint used to draw the panels."),
                io.String.Input("story", multiline=True, default=DEFAULT_STORY, tooltip=STORY_TOOLTIP),
                io.Combo.Input("style", options=list(STYLE_NAMES), default="none",
                               tooltip="Style preset: wraps every panel prompt and adds the style's negatives."),
                io.String.Input("negative", multiline=True, default=DEFAULT_NEGATIVE,
                                tooltip="Negative prompt shared by all panels (the style's negatives are appended)."),
            ],
            outputs=[
                io.Conditioning.Output("positive", display_name="positive", tooltip="One entry with a batch of panel_count rows (row i = panel i), "
                                       "all padded to the same token length; pooled_output per panel when the CLIP has one."),
                io.Conditioning.Output("negative_conditioning", display_name="negative", tooltip="Negative conditioning (batch 1) with the style's negatives."),
                io.Int.Output("panel_count", display_name="panel_count", tooltip="Number of panels: use as the batch_size of the empty latent."),
                io.String.Output("captions", display_name="captions", tooltip="One line per panel (empty line for a panel without caption), "
                                 "for SDN_ComicLayout."),
                STORY.Output("parsed_story", display_name="story", tooltip="The parsed story (characters, panels, who appears where) for "
                                 "nodes that route characters per panel."),
            ],
        )

    @classmethod
    def execute(cls, clip, story, style, negative) -> io.NodeOutput:
        import dataclasses

        parsed = dataclasses.replace(parse_story(story), style=style)
        parsed.styled_prompts()  # unknown style -> NodeInputError before any encoding
        positive, neg, parsed = encode_story(clip, parsed, negative)
        return io.NodeOutput(positive, neg, len(parsed.panels), "\n".join(parsed.captions), parsed)


class ComicLayout(io.ComfyNode):
    """Lay panel images out on comic pages, with optional captions."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SDN_ComicLayout",
            display_name="Comic Layout (StoryDiffusion)",
            category="StoryDiffusion/story",
            description="Arranges a batch of panel images on pages of equal size (grid, four panel, classic rows "
                        "of 1-2-3 panels, strip). Panels are center-cropped to their cells; captions are drawn in "
                        "a translucent box at the panel bottom, in a font that has their characters. With the story "
                        "connected, its dialogue lines are drawn as speech, thought, shout and whisper bubbles and "
                        "narration boxes, in reading order, away from the characters when their masks are given.",
            inputs=[
                io.Image.Input("images", tooltip="Panel images in story order (a batch; any size)."),
                io.Combo.Input("layout", options=list(LAYOUTS), default="classic",
                               tooltip="grid: rows x columns; four panel: 2x2; classic: rows holding 1, 2, 3, 1... "
                                       "panels; strip: one row of 'columns' panels per page."),
                io.Combo.Input("reading_direction", options=list(DIRECTIONS), default="left-to-right",
                               tooltip="Order in which panels fill each row; right-to-left (manga) reorders panels, "
                                       "it does not mirror images."),
                io.Int.Input("page_width", default=1024, min=64, max=16384, step=8, tooltip="Page width in pixels."),
                io.Int.Input("page_height", default=1448, min=64, max=16384, step=8, tooltip="Page height in pixels."),
                io.Int.Input("rows", default=3, min=1, max=32,
                             tooltip="Rows per page for grid and classic (ignored by four panel and strip)."),
                io.Int.Input("columns", default=2, min=1, max=32,
                             tooltip="Panels per row for grid, panels per page for strip (ignored otherwise)."),
                io.Int.Input("gutter", default=16, min=0, max=512,
                             tooltip="Space between panels and around the page edge, in pixels."),
                io.Int.Input("border_width", default=4, min=0, max=128,
                             tooltip="Panel border thickness in pixels (drawn inside each cell)."),
                io.String.Input("border_color", default="#000000",
                                tooltip="Border color: '#RRGGBB', '#RGB' or a color name."),
                io.String.Input("background_color", default="#FFFFFF",
                                tooltip="Page (gutter and empty cell) color: '#RRGGBB', '#RGB' or a color name."),
                io.Int.Input("caption_font_size", default=24, min=6, max=256,
                             tooltip="Caption and bubble font size in pixels (shrunk automatically if a caption would "
                                     "cover more than half its panel, or a panel's bubbles do not fit)."),
                io.String.Input("font_path", default="", optional=True,
                                tooltip="Path to a .ttf/.otf/.ttc font for captions and bubbles. Empty, or for "
                                        "characters this font lacks: bubbles try an installed comic font (Comic "
                                        "Neue, Comic Relief, Comic Sans MS); then Pillow's built-in font, else an "
                                        "installed font that has them."),
                io.String.Input("captions", default="", multiline=True, optional=True,
                                tooltip="One caption per line, line i for panel i (connect SDN_StoryPrompt's "
                                        "captions); empty lines mean no caption. Any script: CJK, Hebrew and "
                                        "Arabic (right to left) included; characters no font has are an error. "
                                        "With story connected: leave empty (the story's captions are used) or "
                                        "connect the same story's captions."),
                STORY.Input("story", optional=True, tooltip=(
                    "The story of these panels (SDN_StoryPrompt's story; image i = panel i): its captions, and its "
                    "'>' dialogue lines drawn as bubbles.")),
                io.Mask.Input("character_masks", optional=True, tooltip=(
                    "SDN_CharacterMaskImages' masks of these panels (row = panel x characters + character): bubbles "
                    "avoid the characters and tails end on the speaker. Needs story.")),
            ],
            outputs=[io.Image.Output("pages", display_name="pages", tooltip="The pages, all page_width x page_height."),
                     io.String.Output("bubble_layout", display_name="bubble layout", tooltip=(
                         "The bubbles as JSON: a list of {page, panel (0-based), line (story line), kind, speaker, "
                         "text, box, text_box, tail, font_size, lines, overflow}, page pixels.")),
                     io.Mask.Output("bubble_masks", display_name="bubble masks", tooltip=(
                         "Per page: 1 where a bubble (body, tail, narration box) is drawn."))],
        )

    @classmethod
    def execute(cls, images, layout, reading_direction, page_width, page_height, rows, columns, gutter,
                border_width, border_color, background_color, caption_font_size, font_path="",
                captions="", story=None, character_masks=None) -> io.NodeOutput:
        spec = LayoutSpec(layout=layout, reading_direction=reading_direction, page_width=page_width,
                          page_height=page_height, rows=rows, columns=columns, gutter=gutter,
                          border_width=border_width, border_color=border_color, background_color=background_color,
                          caption_font_size=caption_font_size, font_path=font_path or "")
        return io.NodeOutput(*compose_comic(images, spec, split_captions(captions or ""), story, character_masks))


class StoryPanels(io.ComfyNode):
    """Select the reference panels of a character, the rest of the story, or all panels (reference mode)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SDN_StoryPanels",
            display_name="Story Panels (StoryDiffusion)",
            category="StoryDiffusion/story",
            description="StoryDiffusion's reference mode: a character's reference panels (the first panels that name "
                        "only that character) are drawn together while its bank is recorded; every other panel is "
                        "drawn reading the banks. This node selects either set and slices the per-panel "
                        "conditioning to match. Selected panels keep their place in the story for merging.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="Per-panel conditioning (row i = panel i of the story input), "
                                      "from SDN_StoryPrompt or another SDN_StoryPanels."),
                STORY.Input("story", tooltip="The story the conditioning belongs to (SDN_StoryPrompt's parsed_story)."),
                io.Combo.Input("part", options=list(PARTS), default="references", tooltip=(
                    "references: the first reference_count panels that name the character and no one else "
                    "(no [NC], no other character). rest: every panel that is not a reference of any character "
                    "of the story. all: every panel (e.g. when all banks are loaded from files).")),
                io.String.Input("character", default="", tooltip=(
                    "Character whose references to select (its name without brackets); empty = the story's "
                    "first character; * = every character's, in story order (e.g. all references in front of "
                    "bank-free batches). Ignored by rest and all.")),
                io.Int.Input("reference_count", default=1, min=1, max=64, tooltip=(
                    "References per character (the reference app's id_length). Use the same value in the "
                    "references and rest nodes.")),
            ],
            outputs=[
                io.Conditioning.Output("selected_positive", display_name="positive", tooltip="The selected rows of the conditioning (pooled_output "
                                       "and attention_mask sliced alike)."),
                STORY.Output("selected_story", display_name="story", tooltip="The selected panels as a story; each panel keeps its index in the "
                                 "full story (for SDN_ReadCharacterBanks routing and SDN_MergePanels)."),
                io.Int.Output("panel_count", display_name="panel_count", tooltip="Number of selected panels (the latent batch size)."),
                io.String.Output("captions", display_name="captions", tooltip="The selected panels' captions, one line per panel."),
            ],
        )

    @classmethod
    def execute(cls, positive, story, part, character, reference_count) -> io.NodeOutput:
        positions, selected = select_panels(story, part, character, reference_count)
        cond = slice_conditioning(positive, positions, len(story.panels), "SDN_StoryPanels")
        return io.NodeOutput(cond, selected, len(positions), "\n".join(selected.captions))


class StoryBatches(io.ComfyNode):
    """Split panels into batches: the KSampler and everything after it run once per batch (list outputs)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SDN_StoryBatches",
            display_name="Story Batches (StoryDiffusion)",
            category="StoryDiffusion/story",
            description="Splits the panels into consecutive batches of at most batch_size. Every output is a list "
                        "(one item per batch), so the nodes after it (Read Character Banks, KSampler, VAE Decode) run "
                        "once per batch and peak memory does not grow with story length. Collect the images with "
                        "Merge Panels.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="Per-panel conditioning of the story input (e.g. SDN_StoryPanels "
                                      "rest)."),
                STORY.Input("story", tooltip="The panels to draw (row i of positive = panel i)."),
                io.Int.Input("batch_size", default=4, min=1, max=4096, tooltip="Panels drawn together in one KSampler "
                             "run; the last batch holds the remainder."),
                io.Int.Input("width", default=768, min=16, max=16384, step=8,
                             tooltip="Image width in pixels (as Empty Latent Image; use the references' size)."),
                io.Int.Input("height", default=768, min=16, max=16384, step=8,
                             tooltip="Image height in pixels (as Empty Latent Image; use the references' size)."),
                io.Conditioning.Input("reference_positive", optional=True, tooltip=(
                    "Bank-free reference mode: the reference panels' conditioning (SDN_StoryPanels references), put in "
                    "front of EVERY batch. Sample with SDN_ConsistentSelfAttention reference_count = their number: "
                    "every panel then sees exactly the reference tokens a character bank would give it, for the "
                    "compute of the extra images and no bank memory. Needs reference_story.")),
                STORY.Input("reference_story", optional=True, tooltip=(
                    "The reference panels of reference_positive (row i = panel i). Merge Panels keeps each once.")),
                io.Latent.Input("empty_latent", optional=True, tooltip=(
                    "An empty latent whose channels and size every batch copies (e.g. Empty SD3 Latent Image for "
                    "Flux): overrides width and height. Without it: SD1.x/SDXL latents (4 channels, 1/8 size).")),
            ],
            outputs=[
                io.Conditioning.Output("batch_positive", display_name="positive", is_output_list=True, tooltip="Per batch: its rows of the conditioning."),
                io.Latent.Output("latent", display_name="empty latent", is_output_list=True, tooltip="Per batch: an empty latent with one image per panel."),
                STORY.Output("batch_story", display_name="story", is_output_list=True, tooltip="Per batch: its panels (connect to Read Character "
                                 "Banks' story and to Merge Panels)."),
                io.Int.Output("panel_count", display_name="panel_count", is_output_list=True, tooltip="Per batch: its number of panels."),
            ],
        )

    @classmethod
    def execute(cls, positive, story, batch_size, width, height, reference_positive=None, reference_story=None,
                empty_latent=None) -> io.NodeOutput:
        node = "SDN_StoryBatches"
        total = len(story.panels)
        if total == 0:
            raise NodeInputError(node, "story", "a story with at least one panel")
        refs = reference_rows(node, reference_positive, reference_story)
        shape, extras = latent_layout(node, empty_latent, width, height)
        conds, latents, stories, counts = [], [], [], []
        for rows in split_batches(total, batch_size):
            cond = slice_conditioning(positive, rows, total, node)
            panels = [story.panels[i] for i in rows]
            samples = {**extras, "samples": torch.zeros([len(refs[1]) + len(rows), *shape], device=_device())}
            if refs[1]:
                # the references' own noise in every batch (noise indices 0..R-1), each panel's after them
                cond = concat_conditioning(refs[0], cond, (len(refs[1]), len(rows)), node, "reference_positive",
                                           "positive")
                panels = list(refs[1]) + panels
                samples["batch_index"] = list(range(len(refs[1]))) + [len(refs[1]) + i for i in rows]
            conds.append(cond)
            latents.append(samples)
            stories.append(sub_story(story, panels, carried=len(refs[1])))
            counts.append(len(panels))
        return io.NodeOutput(conds, latents, stories, counts)


def _device():
    import comfy.model_management

    return comfy.model_management.intermediate_device()


class MergePanels(io.ComfyNode):
    """Put panel images drawn in several runs (batches, references) back in story order."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SDN_MergePanels",
            display_name="Merge Panels (StoryDiffusion)",
            category="StoryDiffusion/story",
            description="Collects panel images from several runs (every batch of Story Batches, the references "
                        "drawn separately) into one batch sorted by the panels' place in the story, with their "
                        "captions, ready for Comic Layout.",
            is_input_list=True,
            inputs=[
                io.Image.Input("images", tooltip="Panel images: one item per run (a list from Story Batches is "
                               "collected whole); image i of item k is panel i of story item k."),
                STORY.Input("story", tooltip="The panels of each images item, in the same order (Story Batches' "
                                "story, or Story Panels' story)."),
                io.Image.Input("images_2", optional=True, tooltip="More panel images, e.g. the references."),
                STORY.Input("story_2", optional=True, tooltip="The panels of images_2."),
                io.Image.Input("images_3", optional=True, tooltip="More panel images, e.g. a second character's "
                               "references."),
                STORY.Input("story_3", optional=True, tooltip="The panels of images_3."),
            ],
            outputs=[
                io.Image.Output("merged_images", display_name="images", tooltip="All panel images in story order (one batch)."),
                io.String.Output("captions", display_name="captions", tooltip="Their captions, one line per panel (for Comic Layout)."),
                io.Int.Output("panel_count", display_name="panel_count", tooltip="Number of merged panels."),
            ],
        )

    @classmethod
    def execute(cls, images, story, images_2=None, story_2=None, images_3=None, story_3=None) -> io.NodeOutput:
        node = "SDN_MergePanels"
        groups = []
        for suffix, imgs, stories in (("", images, story), ("_2", images_2, story_2), ("_3", images_3, story_3)):
            if imgs is None and stories is None:
                continue
            if imgs is None or stories is None:
                missing = "images" + suffix if imgs is None else "story" + suffix
                raise NodeInputError(node, missing, f"a connection (images{suffix} and story{suffix} go together)")
            if len(imgs) != len(stories):
                raise NodeInputError(node, "story" + suffix, f"one story item per images item ({len(imgs)} image "
                                     "batches)", got=f"{len(stories)} story items")
            groups += [(f"images{suffix}" + (f" item {k + 1}" if len(imgs) > 1 else ""), im, st)
                       for k, (im, st) in enumerate(zip(imgs, stories))]
        merged, panels = merge_panels(groups, node)
        return io.NodeOutput(merged, "\n".join(p.caption for p in panels), len(panels))


NODES = [StoryPrompt, ComicLayout, StoryPanels, StoryBatches, MergePanels]

"""Story prompts and comic pages: SDN_StoryPrompt, SDN_ComicLayout. Logic lives in ``story/``."""
from __future__ import annotations

from comfy_api.latest import io

from ..story.encode import encode_story
from ..story.layout import DIRECTIONS, LAYOUTS, LayoutSpec, compose_pages, split_captions
from ..story.parser import parse_story
from ..story.styles import STYLE_NAMES

StoryType = io.Custom("SDN_STORY")

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
    "without a character, text after the last '#' is the panel's caption. Blank lines and lines starting "
    "with '//' are ignored.")


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
                io.Conditioning.Output("positive", tooltip="One entry with a batch of panel_count rows (row i = panel i), "
                                       "all padded to the same token length; pooled_output per panel when the CLIP has one."),
                io.Conditioning.Output("negative_conditioning", display_name="negative", tooltip="Negative conditioning (batch 1) with the style's negatives."),
                io.Int.Output("panel_count", tooltip="Number of panels: use as the batch_size of the empty latent."),
                io.String.Output("captions", tooltip="One line per panel (empty line for a panel without caption), "
                                 "for SDN_ComicLayout."),
                StoryType.Output("parsed_story", display_name="story", tooltip="The parsed story (characters, panels, who appears where) for "
                                 "nodes that route characters per panel."),
            ],
        )

    @classmethod
    def execute(cls, clip, story, style, negative) -> io.NodeOutput:
        import dataclasses

        parsed = dataclasses.replace(parse_story(story), style=style)
        parsed.styled_prompts()  # unknown style -> NodeInputError before any encoding
        positive, neg = encode_story(clip, parsed, negative)
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
                        "a translucent box at the panel bottom.",
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
                             tooltip="Caption font size in pixels (shrunk automatically if a caption would "
                                     "cover more than half its panel)."),
                io.String.Input("font_path", default="", optional=True,
                                tooltip="Path to a .ttf/.otf font for captions; empty = Pillow's built-in font."),
                io.String.Input("captions", default="", multiline=True, optional=True,
                                tooltip="One caption per line, line i for panel i (connect SDN_StoryPrompt's "
                                        "captions); empty lines mean no caption."),
            ],
            outputs=[io.Image.Output("pages", tooltip="The pages, all page_width x page_height.")],
        )

    @classmethod
    def execute(cls, images, layout, reading_direction, page_width, page_height, rows, columns, gutter,
                border_width, border_color, background_color, caption_font_size, font_path="",
                captions="") -> io.NodeOutput:
        spec = LayoutSpec(layout=layout, reading_direction=reading_direction, page_width=page_width,
                          page_height=page_height, rows=rows, columns=columns, gutter=gutter,
                          border_width=border_width, border_color=border_color, background_color=background_color,
                          caption_font_size=caption_font_size, font_path=font_path or "")
        return io.NodeOutput(compose_pages(images, spec, split_captions(captions or "")))


NODES = [StoryPrompt, ComicLayout]

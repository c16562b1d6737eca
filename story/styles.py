"""Style presets for story panels: a template around the panel prompt plus negatives.

The reference app (HVision-NKU/StoryDiffusion) offers presets of this kind; the wording here is this pack's own.
Each preset is ``(template, negative)``: ``template`` holds ``{prompt}`` where the panel's expanded prompt goes;
``negative`` is appended (comma-separated) to the user's negative prompt. ``"none"`` changes nothing.
"""
from __future__ import annotations

from ..errors import NodeInputError

STYLES: dict[str, tuple[str, str]] = {
    "none": ("{prompt}", ""),
    "comic book": (
        "comic book panel, {prompt}, bold ink outlines, halftone shading, vivid flat colors, dynamic composition",
        "photograph, photorealistic, 3d render, blurry, washed out colors"),
    "manga": (
        "manga panel, {prompt}, black and white, screentone shading, expressive ink lines, high contrast",
        "color, photograph, photorealistic, 3d render, western comic, blurry"),
    "anime": (
        "anime illustration, {prompt}, cel shading, clean line art, vibrant colors, detailed background",
        "photograph, photorealistic, 3d render, realistic skin texture, lowres, blurry"),
    "cinematic": (
        "cinematic film still, {prompt}, dramatic lighting, shallow depth of field, anamorphic, film grain, color graded",
        "cartoon, anime, drawing, illustration, flat colors, oversaturated, lowres"),
    "line art": (
        "line art drawing, {prompt}, clean monochrome lines, white background, minimal shading, ink on paper",
        "color, photograph, painting, gradient, heavy shading, blurry, noisy"),
    "watercolor storybook": (
        "children's storybook illustration, {prompt}, soft watercolor washes, gentle colors, paper texture, whimsical",
        "photograph, photorealistic, 3d render, harsh lighting, dark, gritty, text"),
    "photographic": (
        "professional photograph, {prompt}, natural lighting, sharp focus, 35mm lens, highly detailed",
        "drawing, painting, illustration, cartoon, anime, 3d render, deformed, lowres"),
    "fantasy art": (
        "fantasy concept art, {prompt}, epic scale, painterly detail, atmospheric light, rich colors",
        "photograph, modern clothing, lowres, blurry, flat lighting"),
}

STYLE_NAMES: tuple[str, ...] = tuple(STYLES)


def _get(style: str) -> tuple[str, str]:
    try:
        return STYLES[style]
    except KeyError:
        raise NodeInputError("SDN_StoryPrompt", "style", f"one of {', '.join(STYLE_NAMES)}", got=repr(style)) from None


def apply_style(style: str, prompt: str) -> str:
    """Wrap ``prompt`` with preset ``style``'s template. NodeInputError for an unknown style."""
    template, _ = _get(style)
    return template.replace("{prompt}", prompt)


def style_negative(style: str, negative: str) -> str:
    """The user's ``negative`` with the style's negatives appended (``", "``-joined, empty parts skipped)."""
    _, extra = _get(style)
    parts = [p for p in (negative.strip().rstrip(","), extra) if p]
    return ", ".join(parts)

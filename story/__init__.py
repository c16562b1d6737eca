"""Story prompts (StoryDiffusion prompt syntax), style presets, per-panel text encoding and comic pages.

``parser``: pure-Python story parser (``parse_story`` -> ``Story``, the SDN_STORY payload).
``styles``: style presets. ``encode``: per-panel CONDITIONING with ComfyUI's CLIP API.
``layout``: comic pages from a batch of panel images (Pillow). ``bubbles``: dialogue bubbles on those pages.
"""

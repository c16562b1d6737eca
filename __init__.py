"""StoryDiffusion for ComfyUI, natively: Consistent Self-Attention, story prompts, comic pages and
transition videos (Semantic Motion Predictor). See README.md.

Kept light on purpose: ComfyUI imports this at start-up; node modules load in ``comfy_entrypoint``.
"""

WEB_DIRECTORY = None


async def comfy_entrypoint():
    from .nodes import StoryDiffusionExtension

    return StoryDiffusionExtension()

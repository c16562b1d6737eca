"""Character masks (issue 10): a model that records where each panel's image attends to its characters' words,
and the masks as a MASK output. Logic lives in attention/masks.py."""
from comfy_api.latest import io

from ..attention.masks import apply_masks
from ..errors import NodeInputError
from .types import MASK_RECORDER, STORY


class CharacterMasks(io.ComfyNode):
    """A MODEL that records each panel's character masks from its cross-attention (a DiT: its joint attention to
    the characters' words) while the panels are sampled."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SDN_CharacterMasks", display_name="Character Masks (StoryDiffusion)",
            category="StoryDiffusion/characters", description=cls.__doc__,
            inputs=[
                io.Model.Input("model", tooltip=(
                    "An SD1.x/SD2.x/SDXL model (masks from cross-attention) or a DiT: Flux.1, Chroma, SD3/SD3.5 "
                    "(masks from the text part of the early blocks' joint attention); Flux.2, Qwen-Image, Lumina2, "
                    "Z-Image and HiDream with given masks only. CSA, IP-Adapter and other patches are kept.")),
                STORY.Input("story", tooltip=(
                    "SDN_StoryPrompt's story output: its panels' character token spans. Sample its positive "
                    "conditioning, one image per panel.")),
                io.Mask.Input("masks", optional=True, tooltip=(
                    "Your own masks instead of the attention-derived ones (e.g. from a segmentation node): one per "
                    "panel and character, row = panel x characters + character as Character Mask Images outputs "
                    "them, any size, values in [0, 1]. Used at every step, from the first.")),
                io.Float.Input("threshold", default=0.5, min=0.0, max=1.0, step=0.01, optional=True, tooltip=(
                    "For subject-masked CSA: a token lies in a character's region where the mask (normalised to "
                    "[0, 1]) exceeds this.")),
            ],
            outputs=[io.Model.Output("recording_model", display_name="recording model",
                                    tooltip="Sample the panels with this model."),
                     MASK_RECORDER.Output("recorder", display_name="recorder",
                                          tooltip="Connect to Character Mask Images together with the samples.")])

    @classmethod
    def execute(cls, model, story, masks=None, threshold=0.5):
        node = "SDN_CharacterMasks"
        if masks is None and not any(p.spans for p in story.panels):
            raise NodeInputError(node, "story", "the story output of SDN_StoryPrompt, whose panels hold their "
                                 "characters' token spans (or connect masks)", got="a story without token spans")
        given = None
        if masks is not None:
            rows = len(story.panels) * len(story.characters)
            if masks.ndim != 3 or masks.shape[0] != rows:
                raise NodeInputError(node, "masks", f"{rows} masks (panels x characters = {len(story.panels)} x "
                                     f"{len(story.characters)}), row = panel x characters + character",
                                     got=f"shape {tuple(masks.shape)}")
            given = masks.reshape(len(story.panels), len(story.characters), *masks.shape[1:])
        return io.NodeOutput(*apply_masks(model, story, given, threshold))


class MaskImages(io.ComfyNode):
    """The recorded character masks as a MASK: one row per panel and character, with a label per row."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SDN_CharacterMaskImages", display_name="Character Mask Images (StoryDiffusion)",
            category="StoryDiffusion/characters", description=cls.__doc__,
            inputs=[
                MASK_RECORDER.Input("recorder", tooltip="From Character Masks."),
                io.Latent.Input("samples", tooltip=(
                    "The KSampler's output with Character Masks' model: connecting it makes this node wait for "
                    "that sampling; the masks get the image size (8 x its latent size; Flux.2: 16 x).")),
            ],
            outputs=[io.Mask.Output("masks", display_name="masks", tooltip=(
                         "panels x characters masks in [0, 1], row = panel x characters + character; all zeros where "
                         "a panel does not name the character.")),
                     io.String.Output("labels", display_name="labels", tooltip="Which panel and character each row is.")])

    @classmethod
    def execute(cls, recorder, samples):
        latent = samples["samples"]
        if recorder.masks is not None and tuple(latent.shape[-2:]) != recorder.latent_hw:
            raise NodeInputError("SDN_CharacterMaskImages", "samples", f"the latents sampled with Character Masks' "
                                 f"model (latent size {recorder.latent_hw})", got=f"{tuple(latent.shape[-2:])}")
        h, w = (recorder.scale * side for side in latent.shape[-2:])
        return io.NodeOutput(recorder.stacked((h, w)), "\n".join(recorder.labels()))


NODES = [CharacterMasks, MaskImages]

"""Transition nodes: per-frame image embeddings between keyframes, IP-Adapter injection of them, and
per-frame text conditionings (for AnimateDiff-Evolved or any per-frame consumer). Logic: ``motion/``.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..errors import NodeInputError
from ..motion.predictor import INTERPOLATIONS
from ..motion.transition_embeds import EMBEDS_KINDS
from .folders import model_folder
from .types import EMBEDS, IPADAPTER, MOTION_PREDICTOR

CATEGORY = "StoryDiffusion/transition"

JOIN_DOC = ("K keyframes and L frames per transition give (K-1)*(L-1)+1 frames: consecutive transitions share "
            "their boundary frame, so keyframe k is frame k*(L-1).")


def ipadapter_files() -> list[str]:
    """Files of the ComfyUI model folder "ipadapter" (registered as models/ipadapter when no other pack did)."""
    import folder_paths

    return folder_paths.get_filename_list(model_folder("ipadapter", {".safetensors", ".bin"}))


class TransitionEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDN_TransitionEmbeds",
            display_name="Transition Embeds (SMP)",
            category=CATEGORY,
            description="CLIP-vision embeddings for every frame of the transitions between consecutive keyframes "
                        "(interpolated, or predicted by a Semantic Motion Predictor). " + JOIN_DOC,
            inputs=[
                io.ClipVision.Input("clip_vision", tooltip="CLIP vision model (ViT-H/14 for SD1.5 IP-Adapters "
                                    "and the motion predictor)."),
                io.Image.Input("keyframes", tooltip="Keyframe images in order: 2 images (start, end) or all story "
                               "panels (one transition per consecutive pair)."),
                io.Int.Input("frames_per_transition", default=16, min=2, max=1024,
                             tooltip="Frames of each transition, both keyframes included. " + JOIN_DOC),
                io.Combo.Input("interpolation", options=list(INTERPOLATIONS), default="linear",
                               tooltip="linear (paper) or slerp (per token, norm interpolated linearly)."),
                io.Combo.Input("embeds_kind", options=list(EMBEDS_KINDS),
                               default="penultimate_hidden_states",
                               tooltip="penultimate_hidden_states: (frames, 257, 1280) for IP-Adapter plus; "
                                       "image_embeds: (frames, 1024) for plain IP-Adapter."),
                io.Combo.Input("crop", options=["center", "none"], default="center",
                               tooltip="As core CLIPVisionEncode: center-crop to a square, or resize the whole image."),
                MOTION_PREDICTOR.Input("predictor", optional=True,
                                       tooltip="Semantic Motion Predictor (SDN_MotionPredictorLoader). Its token "
                                               "count/width must match embeds_kind and the CLIP vision model. "
                                               "Without it: plain interpolation."),
            ],
            outputs=[
                EMBEDS.Output("embeds", display_name="frame embeds", tooltip="Per-frame embeddings: (frames, 257, 1280) or (frames, 1024)."),
                EMBEDS.Output("negative_embeds", display_name="negative embeds", tooltip="Same shape: encoding of a black image "
                              "(penultimate kind) or zeros (image_embeds kind)."),
                io.ClipVisionOutput.Output("clip_vision_output", display_name="vision output per frame",
                                           tooltip="Per-frame image_embeds, penultimate_hidden_states and "
                                                   "last_hidden_state (the chosen kind = embeds; the others "
                                                   "interpolated from the keyframes)."),
                io.Int.Output("frame_count", display_name="frame_count", tooltip="Frames: (K-1)*(L-1)+1. Use it as the latent batch size."),
            ],
        )

    @classmethod
    def execute(cls, clip_vision, keyframes, frames_per_transition, interpolation, embeds_kind, crop,
                predictor=None) -> io.NodeOutput:
        from ..motion.transition_embeds import transition_embeds

        embeds, negative, output, frames = transition_embeds(
            clip_vision, keyframes, frames_per_transition, interpolation, embeds_kind, predictor,
            crop=(crop == "center"))
        return io.NodeOutput(embeds, negative, output, frames)


class IPAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDN_IPAdapterLoader",
            display_name="Load IP-Adapter (SDN)",
            category=CATEGORY,
            description="Load a standard IP-Adapter checkpoint (ip-adapter_sd15 / ip-adapter-plus_sd15, .bin or "
                        ".safetensors) from models/ipadapter; plain vs plus is detected from the weights.",
            inputs=[
                io.Combo.Input("ipadapter_name", options=ipadapter_files(),
                               tooltip="File in the ComfyUI model folder 'ipadapter'."),
            ],
            outputs=[IPADAPTER.Output("ipadapter", display_name="ipadapter", tooltip=(
                "The parsed IP-Adapter, under ComfyUI's model management (loaded with the model it patches)."))],
        )

    @classmethod
    def execute(cls, ipadapter_name) -> io.NodeOutput:
        import folder_paths
        from ..motion.ip_adapter import load_ip_adapter

        path = folder_paths.get_full_path("ipadapter", ipadapter_name)
        if path is None:
            raise NodeInputError("SDN_IPAdapterLoader", "ipadapter_name", "a file in models/ipadapter",
                                 got=repr(ipadapter_name))
        return io.NodeOutput(load_ip_adapter(path, source=ipadapter_name))


class ApplyTransitionEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDN_ApplyTransitionEmbeds",
            display_name="Apply Transition Embeds (IP-Adapter)",
            category=CATEGORY,
            description="Per-frame IP-Adapter: latent frame f attends to the image tokens of embeds[f] through "
                        "decoupled cross-attention. Honours AnimateDiff-Evolved and core context windows.",
            inputs=[
                io.Model.Input("model", tooltip="SD1.5 (or matching) UNet model."),
                IPADAPTER.Input("ipadapter", tooltip="From SDN_IPAdapterLoader."),
                EMBEDS.Input("embeds", tooltip="One embedding per latent frame (frames = latent batch, or the full "
                             "length under context windows); a single one applies to every frame."),
                io.Float.Input("weight", default=1.0, min=-1.0, max=5.0, step=0.01,
                               tooltip="Scale of the image attention added to the text attention (0 = off)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which the image tokens start to act."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress after which they stop."),
                EMBEDS.Input("negative_embeds", optional=True,
                             tooltip="Embeds for the negative (uncond) rows; same shape. Default: zeros."),
            ],
            outputs=[io.Model.Output(display_name="model with embeds", tooltip="A patched clone of the model.")],
        )

    @classmethod
    def execute(cls, model, ipadapter, embeds, weight, start_percent, end_percent,
                negative_embeds=None) -> io.NodeOutput:
        from ..motion.ip_adapter import IPAdapterModel, apply_ip_adapter

        if not isinstance(ipadapter, IPAdapterModel):
            raise NodeInputError("SDN_ApplyTransitionEmbeds", "ipadapter", "an SDN_IPADAPTER from SDN_IPAdapterLoader",
                                 got=type(ipadapter).__name__)
        if end_percent < start_percent:
            raise NodeInputError("SDN_ApplyTransitionEmbeds", "end_percent", f">= start_percent ({start_percent})",
                                 got=str(end_percent))
        return io.NodeOutput(apply_ip_adapter(model, ipadapter, embeds, negative_embeds, weight,
                                              start_percent, end_percent))


class ConditioningTransition(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDN_ConditioningTransition",
            display_name="Conditioning Transition (per frame)",
            category=CATEGORY,
            description="One per-frame CONDITIONING (dim 0 = frames) through keyframe prompts, for AnimateDiff-"
                        "Evolved. Keyframes: the rows of 'keyframes' (e.g. SDN_StoryPrompt's one entry with dim 0 "
                        "= panels), followed by the rows of 'end' if connected (e.g. two CLIPTextEncode). "
                        "Different token lengths (77 vs 154) are repeated to their least common multiple, which "
                        "leaves cross-attention unchanged. " + JOIN_DOC,
            inputs=[
                io.Conditioning.Input("keyframes", tooltip="Keyframe prompts: one entry whose dim 0 = keyframes "
                                      "(SDN_StoryPrompt), or the start prompt when 'end' is connected."),
                io.Int.Input("frames_per_transition", default=16, min=2, max=1024,
                             tooltip="Frames of each transition, both keyframes included. " + JOIN_DOC),
                io.Combo.Input("interpolation", options=list(INTERPOLATIONS), default="linear",
                               tooltip="linear or slerp (per token, norm interpolated linearly)."),
                io.Conditioning.Input("end", optional=True,
                                      tooltip="Optional: further keyframe prompt(s) appended after 'keyframes'."),
                io.Latent.Input("latent", optional=True,
                                tooltip="Optional: the latent this conditioning will be sampled with. Its batch must "
                                        "equal frame_count (otherwise ComfyUI repeats or cuts the rows silently)."),
            ],
            outputs=[
                io.Conditioning.Output("conditioning", display_name="frame conditioning", tooltip="One entry, dim 0 = frames (SDXL: pooled_output "
                                       "(frames, 1280))."),
                io.Int.Output("frame_count", display_name="frame_count", tooltip="Frames: (K-1)*(L-1)+1."),
            ],
        )

    @classmethod
    def execute(cls, keyframes, frames_per_transition, interpolation, end=None, latent=None) -> io.NodeOutput:
        from ..motion.frame_conditioning import conditioning_transition

        cond, frames = conditioning_transition([keyframes, end], frames_per_transition, interpolation)
        if latent is not None and latent["samples"].shape[0] != frames:
            raise NodeInputError("SDN_ConditioningTransition", "latent",
                                 f"a latent batch of {frames} frames ((keyframes - 1) x (frames_per_transition - 1) "
                                 f"+ 1, this conditioning's rows)", got=f"a batch of {latent['samples'].shape[0]}")
        return io.NodeOutput(cond, frames)


NODES = [TransitionEmbeds, IPAdapterLoader, ApplyTransitionEmbeds, ConditioningTransition]

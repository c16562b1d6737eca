"""Semantic Motion Predictor nodes: load a predictor from ComfyUI's ``models/motion_predictors`` folder.

The folder is registered with ``folder_paths`` when this module is imported (ComfyUI's loader imports it in
``comfy_entrypoint``; registering is cheap and idempotent). ``extra_model_paths.yaml`` may add more paths under
the key ``motion_predictors``.
"""
import json

import folder_paths
from comfy_api.latest import io

from ..errors import NodeInputError
from ..motion.checkpoint import MotionPredictorFileError, load_predictor, predictor_in
from ..motion.managed import module_patcher
from .folders import model_folder
from .types import MOTION_PREDICTOR

FOLDER = "motion_predictors"
EXTENSIONS = {".safetensors"}


def register_model_folder() -> None:
    """Add ``<models>/motion_predictors`` (extension .safetensors) to ComfyUI's model folders; idempotent."""
    model_folder(FOLDER, EXTENSIONS)


register_model_folder()


class MotionPredictorLoader(io.ComfyNode):
    """Load a Semantic Motion Predictor (StoryDiffusion's transition model) trained with
    scripts/train_motion_predictor.py. Its file records the CLIP vision output it was trained on."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        register_model_folder()
        return io.Schema(
            node_id="SDN_MotionPredictorLoader",
            display_name="Load Motion Predictor (StoryDiffusion)",
            category="StoryDiffusion/video",
            description=cls.__doc__,
            inputs=[
                io.Combo.Input("predictor_name", options=folder_paths.get_filename_list(FOLDER), tooltip=(
                    "A .safetensors file in models/motion_predictors. It must have been trained on the same "
                    "CLIP vision model you encode the keyframes with (ViT-H penultimate tokens or image embeds).")),
            ],
            outputs=[MOTION_PREDICTOR.Output(
                "predictor", display_name="predictor",
                tooltip="The predictor, under ComfyUI's model management (put on the GPU while a node uses it).")],
        )

    @classmethod
    def execute(cls, predictor_name) -> io.NodeOutput:
        path = folder_paths.get_full_path(FOLDER, predictor_name)
        if path is None:
            raise NodeInputError("SDN_MotionPredictorLoader", "predictor_name",
                                 f"a file in {folder_paths.get_folder_paths(FOLDER)}", got=repr(predictor_name))
        try:
            return io.NodeOutput(module_patcher(load_predictor(path)))
        except MotionPredictorFileError as e:
            raise NodeInputError("SDN_MotionPredictorLoader", "predictor_name", "a motion predictor file",
                                 got=str(e)) from e


class MotionPredictorInfo(io.ComfyNode):
    """Show what a motion predictor expects: CLIP vision output, tokens, width, frame limit, training notes."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDN_MotionPredictorInfo",
            display_name="Motion Predictor Info (StoryDiffusion)",
            category="StoryDiffusion/video",
            description=cls.__doc__,
            inputs=[MOTION_PREDICTOR.Input("predictor", tooltip="From Load Motion Predictor.")],
            outputs=[io.String.Output("info", display_name="info", tooltip="The predictor's architecture config as JSON text.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, predictor) -> io.NodeOutput:
        config = predictor_in(predictor, "SDN_MotionPredictorInfo").config
        text = json.dumps(config, indent=1, sort_keys=True)
        return io.NodeOutput(text, ui={"text": [text]})


NODES = [MotionPredictorLoader, MotionPredictorInfo]

__all__ = ["NODES", "MotionPredictorLoader", "MotionPredictorInfo", "register_model_folder", "MotionPredictorFileError"]

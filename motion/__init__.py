"""Semantic Motion Predictor (StoryDiffusion video part): model, files, training data and loop.

Import light: ``predictor`` and ``checkpoint`` need only torch and safetensors; ``data``/``train`` (PyAV,
ComfyUI's clip_vision) are imported only by the training command and its tests.
"""
from .predictor import DEFAULT_CONFIG, SemanticMotionPredictor, interpolate, make_config  # noqa: F401
from .checkpoint import (  # noqa: F401
    MotionPredictorCompatError, MotionPredictorFileError, check_encoder_compat, load_predictor,
    save_predictor, tokens_from_clip_vision_output,
)

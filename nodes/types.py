"""Every custom io type of this pack, declared once. Their names are a public API (saved workflows hold them)."""
from comfy_api.latest import io

STORY = io.Custom("SDN_STORY")                        # story.parser.Story
BANK = io.Custom("SDN_BANK")
BANK_RECORDER = io.Custom("SDN_BANK_RECORDER")
MOTION_PREDICTOR = io.Custom("SDN_MOTION_PREDICTOR")  # ModelPatcher of a motion.predictor.SemanticMotionPredictor
IPADAPTER = io.Custom("SDN_IPADAPTER")                # motion.ip_adapter.IPAdapterModel
EMBEDS = io.Custom("EMBEDS")  # ComfyUI_IPAdapter_plus' type: a bare tensor, one row per frame
MASK_RECORDER = io.Custom("SDN_MASK_RECORDER")        # attention.masks.MaskRecorder

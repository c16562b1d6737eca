"""Node definitions (V3 schema). Thin: each node checks its inputs and calls into the pack's packages.

Node ids carry the prefix ``SDN_`` and custom types ``SDN_``: both are a public API (saved workflows
reference them), so never rename them or their inputs.
"""
from comfy_api.latest import ComfyExtension, io


class StoryDiffusionExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .csa_nodes import NODES as csa
        from .story_nodes import NODES as story
        from .bank_nodes import NODES as bank
        from .motion_nodes import NODES as motion
        from .transition_nodes import NODES as transition
        from .mask_nodes import NODES as masks

        return [*csa, *story, *bank, *motion, *transition, *masks]

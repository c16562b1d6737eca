"""What the frontend shows of every node of the pack, read through ComfyUI: the V1 node info it serves at
/object_info (``output`` types, ``output_name`` labels) and the V3 schema it is built from.

Every output is labelled with a name of its own, not its type (a node with two EMBEDS outputs must tell
them apart), while output ids, order and types stay as saved workflows know them (a public API).
"""
import pytest

# node id -> [(output id, type)]: fixed forever (saved workflows connect by slot, scripts by id).
OUTPUTS = {
    "SDN_ConsistentSelfAttention": [("_0_MODEL_", "MODEL")],
    "SDN_StoryPrompt": [("positive", "CONDITIONING"), ("negative_conditioning", "CONDITIONING"),
                        ("panel_count", "INT"), ("captions", "STRING"), ("parsed_story", "SDN_STORY")],
    "SDN_ComicLayout": [("pages", "IMAGE"), ("bubble_layout", "STRING"), ("bubble_masks", "MASK")],
    "SDN_StoryPanels": [("selected_positive", "CONDITIONING"), ("selected_story", "SDN_STORY"),
                        ("panel_count", "INT"), ("captions", "STRING")],
    "SDN_StoryBatches": [("batch_positive", "CONDITIONING"), ("latent", "LATENT"), ("batch_story", "SDN_STORY"),
                         ("panel_count", "INT")],
    "SDN_MergePanels": [("merged_images", "IMAGE"), ("captions", "STRING"), ("panel_count", "INT")],
    "SDN_RecordCharacterBank": [("recording_model", "MODEL"), ("recorder", "SDN_BANK_RECORDER")],
    "SDN_CharacterBank": [("bank", "SDN_BANK"), ("info", "STRING")],
    "SDN_CharacterMasks": [("recording_model", "MODEL"), ("recorder", "SDN_MASK_RECORDER")],
    "SDN_CharacterMaskImages": [("masks", "MASK"), ("labels", "STRING")],
    "SDN_SaveCharacterBank": [("path", "STRING")],
    "SDN_LoadCharacterBank": [("bank", "SDN_BANK"), ("info", "STRING")],
    "SDN_ReadCharacterBanks": [("_0_MODEL_", "MODEL")],
    "SDN_MotionPredictorLoader": [("predictor", "SDN_MOTION_PREDICTOR")],
    "SDN_MotionPredictorInfo": [("info", "STRING")],
    "SDN_TransitionEmbeds": [("embeds", "EMBEDS"), ("negative_embeds", "EMBEDS"),
                             ("clip_vision_output", "CLIP_VISION_OUTPUT"), ("frame_count", "INT")],
    "SDN_IPAdapterLoader": [("ipadapter", "SDN_IPADAPTER")],
    "SDN_ApplyTransitionEmbeds": [("_0_MODEL_", "MODEL")],
    "SDN_ConditioningTransition": [("conditioning", "CONDITIONING"), ("frame_count", "INT")],
}


def pack_nodes(host):
    """{node id: class} of every node ComfyUI loaded from this pack."""
    import sdn_host

    return {k: c for k, c in host.nodes.NODE_CLASS_MAPPINGS.items()
            if getattr(c, "RELATIVE_PYTHON_MODULE", "").endswith("." + sdn_host.PACK_DIR_NAME)}


def bare(name):
    """A label reduced to its letters: 'clip_vision_output', 'CLIP VISION OUTPUT' and 'CLIP_VISION_OUTPUT' agree."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


def test_every_pack_node_is_listed(host):
    assert set(pack_nodes(host)) == set(OUTPUTS)


@pytest.mark.parametrize("node_id", sorted(OUTPUTS))
def test_outputs_have_their_own_display_names(host, node_id):
    cls = pack_nodes(host)[node_id]
    schema = cls.GET_SCHEMA()
    assert [(o.id, o.io_type) for o in schema.outputs] == OUTPUTS[node_id]  # public API unchanged
    info = cls.GET_NODE_INFO_V1()  # what /object_info serves and the frontend labels slots with
    names, types = info["output_name"], info["output"]
    assert list(types) == [t for _, t in OUTPUTS[node_id]]
    for output, name, typ in zip(schema.outputs, names, types):
        assert output.display_name, f"{node_id}: output '{output.id}' has no display name"
        assert bare(name) != bare(typ), f"{node_id}: output '{output.id}' is labelled with its type {typ}"
    assert len({bare(n) for n in names}) == len(names), f"{node_id}: two outputs share a label: {names}"

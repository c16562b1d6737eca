def test_pack_loaded_through_comfy_loader(host):
    ids = [k for k in host.nodes.NODE_CLASS_MAPPINGS if k.startswith("SDN_")]
    assert ids, "the pack registered no SDN_ nodes"

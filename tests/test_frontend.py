"""Every shipped workflow opened in the real ComfyUI frontend, the way a user opens it, then queued from there.

One ComfyUI server (ComfyUI's own main.py through scripts/comfy_server.py, with the frontend the host pins,
comfyui-frontend-package 1.32.9) on a free port of 127.0.0.1 with this pack and the test-only nodes of
tests/sdn_test_nodes, and one headless Chromium (Debian's chromium + chromium-driver, driven by Selenium)
serve all workflows. Each workflow is loaded with the page's own ``app.loadGraphData``; what the frontend
then reports is checked: missing node types (its dialog and the nodes it marks), the widget values and sizes
it keeps, its own node bounding boxes (no node covers another), every text box showing all of its text, the
output labels it shows, console errors. The page's ``app.graphToPrompt()`` gives the prompt a user would
queue: its combo values are checked against /object_info (ComfyUI 0.3.75 does not check V3 combos when a
prompt is queued), and it must equal what the in-process workflow tests execute. One workflow per mode is
then queued over HTTP: checkpoint loader swapped for SDNTest_TinyCheckpoint (real SD1.5 layout, small widths,
random weights), sizes and steps shrunk as in the other workflow tests, POSTed to /prompt, /history polled,
and the saved pages fetched back from /view. The transition workflows need AnimateDiff-Evolved, which cannot
be installed here: they are checked up to exactly those missing nodes. The template browser's routes list every
workflow and serve its thumbnail (workflows/<name>.jpg), which the page decodes at its size.

Without a browser the test is skipped with the reason; with CI set (CI runs `CI=true bash .ci/run` as root,
and scripts/setup_test_env.sh installs the browser) it fails instead.
"""
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted(p.name for p in (REPO / "workflows").glob("*.json"))
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1600,1000"]
ANIMATEDIFF_EVOLVED = {"ADE_LoadAnimateDiffModel", "ADE_ApplyAnimateDiffModelSimple",
                       "ADE_StandardUniformContextOptions", "ADE_UseEvolvedSampling"}
# Combo inputs naming the user's own model files: valid once the user has them (checked after the swap).
USER_FILES = {("CheckpointLoaderSimple", "ckpt_name"), ("CLIPVisionLoader", "clip_name"),
              ("PhotoMakerLoader", "photomaker_model_name"), ("SDN_IPAdapterLoader", "ipadapter_name"),
              ("SDN_MotionPredictorLoader", "predictor_name"), ("UNETLoader", "unet_name"), ("VAELoader", "vae_name"),
              ("DualCLIPLoader", "clip_name1"), ("DualCLIPLoader", "clip_name2"), ("CLIPLoader", "clip_name")}
SIZE, STEPS, PAGE = 64, 2, 256
# Queued through the server: one workflow of each mode, with the pages it saves (4 panels on a "four panel"
# page; 12 panels on "classic" pages of 6). Every workflow's prompt is checked equal to the one the in-process
# tests execute (test_comic_workflows.py, test_bank_workflows.py, test_transition_workflows.py); queuing them
# all here too would cost minutes on a CPU (random CLIP-G and PhotoMaker encoders for the SDXL ones).
PAGES = {"comic_sd15.json": 1, "long_story_sd15.json": 2}

LOAD = """
const [workflow, done] = arguments;
const frame = () => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
(async () => {
  // Close the previous workflow's dialog first: the frontend shows one dialog per kind at a time.
  document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click());
  for (let i = 0; i < 100 && document.querySelector('.p-dialog'); i++) await frame();
  await window.app.loadGraphData(workflow);
  await frame();
  const dialogs = Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText);
  const nodes = window.app.graph._nodes.map(n => ({
    id: n.id, type: n.type, registered: n.type in LiteGraph.registered_node_types, has_errors: !!n.has_errors,
    size: Array.from(n.size), box: Array.from(n.boundingRect), widgets_values: n.serialize().widgets_values || [],
    outputs: (n.outputs || []).map(o => o.label || o.localized_name || o.name)}));
  // Text boxes are DOM elements drawn only near the view: show each node at 100 % before measuring.
  const texts = [];
  const canvas = window.app.canvas;
  for (const n of window.app.graph._nodes) {
    const boxes = (n.widgets || []).filter(w => w.element && w.element.tagName === 'TEXTAREA');
    if (!boxes.length) continue;
    canvas.ds.scale = 1;
    canvas.ds.offset = [-n.pos[0] + 50, -n.pos[1] + 50];
    canvas.setDirty(true, true);
    await frame();
    for (const w of boxes) texts.push({id: n.id, type: n.type, widget: w.name, shown: w.element.clientHeight,
                                       needed: w.element.scrollHeight});
  }
  const prompt = (await window.app.graphToPrompt()).output;
  done({dialogs, nodes, texts, prompt});
})().catch(e => done({error: String(e && e.stack || e)}));
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing_browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    missing += [m for m in ("selenium", "comfyui_frontend_package") if importlib.util.find_spec(m) is None]
    return missing


class Server:
    def __init__(self, url):
        self.url = url

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.read()

    def json(self, path, payload=None):
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                body = r.read()
                return json.loads(body) if body else None
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{path}: HTTP {e.code}: {e.read().decode()[:4000]}") from None


def _start_server(base, log):
    port = _free_port()
    command = [sys.executable, str(REPO / "scripts" / "comfy_server.py"), "--cpu", "--listen", "127.0.0.1",
               "--port", str(port), "--base-directory", str(base), "--disable-all-custom-nodes",
               "--whitelist-custom-nodes", "comfyui-storydiffusion-native", "sdn_test_nodes", "--disable-api-nodes",
               "--database-url", "sqlite:///:memory:"]  # its default lies in the ComfyUI folder, not the base
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO))
    server = Server(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            if "SDN_StoryPrompt" in json.loads(server.get("/object_info/SDN_StoryPrompt")):
                return process, server
        except (OSError, ValueError):
            time.sleep(0.5)
    process.kill()
    log.flush()
    raise AssertionError(f"ComfyUI did not start; its log:\n{Path(log.name).read_text()[-4000:]}")


def _start_browser(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tempfile.mkdtemp(prefix='sdn-chromium-')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(120)
    driver.get(server.url + "/")
    deadline = time.monotonic() + 120
    while not driver.execute_script("return !!(window.app && window.app.graph && window.LiteGraph "
                                    "&& LiteGraph.registered_node_types['SDN_StoryPrompt'])"):
        assert time.monotonic() < deadline, "the frontend did not finish loading"
        time.sleep(0.25)
    return driver


def _frontend_versions(root):
    """(the frontend version the ComfyUI tree at ``root`` pins, the one installed here or None)."""
    import importlib.metadata
    import re

    pins = re.findall(r"^comfyui-frontend-package==(\S+)", (root / "requirements.txt").read_text(), re.M)
    try:
        installed = importlib.metadata.version("comfyui-frontend-package")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    return (pins[0] if pins else None), installed


@pytest.fixture(scope="module")
def frontend(host, tmp_path_factory):
    """(browser, server): one ComfyUI server and one browser for all workflows."""
    missing = _missing_browser()
    if missing:
        reason = (f"no browser for the frontend test: {', '.join(missing)} missing "
                  "(run `bash scripts/setup_test_env.sh` as root to install them)")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    pinned, installed = _frontend_versions(host.root)
    if pinned != installed:  # e.g. the suite run against a current ComfyUI tree through COMFYUI_PATH
        pytest.skip(f"this ComfyUI pins comfyui-frontend-package {pinned}, this Python has {installed}")
    base = host.base_directory  # shares the session's test models (files only; the processes are separate)
    tests_nodes = base / "custom_nodes" / "sdn_test_nodes"
    if not tests_nodes.exists():
        tests_nodes.symlink_to(REPO / "tests" / "sdn_test_nodes", target_is_directory=True)
    _write_inputs(base / "input")
    log = open(tmp_path_factory.mktemp("frontend") / "comfyui.log", "w")
    process, server = _start_server(base, log)
    driver = None
    try:
        # A returning user: a first start would open the template browser over the canvas.
        server.json("/settings/Comfy.TutorialCompleted", True)
        driver = _start_browser(server)
        yield driver, server
    finally:
        if driver is not None:
            driver.quit()
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _write_inputs(folder):
    """The images the workflows name: a face for PhotoMaker, two keyframes for the transition video."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    images = {"face.png": data.astronaut()[20:250, 140:370], "keyframe_start.png": data.astronaut(),
              "keyframe_end.png": data.chelsea()}
    for name, pixels in images.items():
        if not (folder / name).exists():
            Image.fromarray(pixels).convert("RGB").resize((96, 96)).save(folder / name)


def open_workflow(driver, name):
    """Load a shipped workflow in the page; return what the frontend made of it, and its console errors."""
    workflow = json.loads((REPO / "workflows" / name).read_text())
    driver.get_log("browser")  # only what this load logs
    seen = driver.execute_async_script(LOAD, workflow)
    assert "error" not in seen, seen.get("error")
    # The frontend asks its registry (api.comfy.org) about node packs; the closed test network blocks that.
    errors = [e["message"] for e in driver.get_log("browser")
              if e["level"] == "SEVERE" and "api.comfy.org" not in e["message"]]
    return workflow, seen, errors


def combo_errors(prompt, object_info, skip=frozenset()):
    """Widget values of ``prompt`` outside the combo options /object_info lists (links are not values)."""
    wrong = []
    for nid, node in prompt.items():
        spec = object_info[node["class_type"]]["input"]
        inputs = {**spec.get("required", {}), **spec.get("optional", {})}
        for name, value in node["inputs"].items():
            if isinstance(value, list) or (node["class_type"], name) in skip or name not in inputs:
                continue
            kind, options = inputs[name][0], (inputs[name][1] if len(inputs[name]) > 1 else {})
            choices = kind if isinstance(kind, list) else options.get("options") if kind == "COMBO" else None
            if choices is not None and value not in choices:
                wrong.append(f"node {nid} {node['class_type']}.{name} = {value!r}")
    return wrong


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_opens_readable_in_the_frontend(host, frontend, name):
    import sdn_host

    driver, server = frontend
    workflow, seen, errors = open_workflow(driver, name)
    saved = {n["id"]: n for n in workflow["nodes"]}
    nodes = {n["id"]: n for n in seen["nodes"]}
    assert set(nodes) == set(saved)

    # Missing node types: exactly AnimateDiff-Evolved's, in the frontend's dialog and on its canvas.
    expected_missing = {n["type"] for n in saved.values()} & ANIMATEDIFF_EVOLVED
    broken = {nid for nid, n in nodes.items() if n["has_errors"] or not n["registered"]}
    assert {nodes[nid]["type"] for nid in broken} == expected_missing
    if expected_missing:
        (dialog,) = seen["dialogs"]
        assert "missing nodes" in dialog and set(dialog.split("\n")) >= expected_missing
    else:
        assert not seen["dialogs"]

    # The frontend keeps every widget value (it may append its UI-only ones, such as LoadImage's upload button)
    # and every saved size (enough room for the widgets).
    for nid, node in nodes.items():
        values = saved[nid].get("widgets_values") or []
        assert node["widgets_values"][:len(values)] == values, f"node {nid} {node['type']}"
        assert node["size"] == pytest.approx(saved[nid]["size"]), f"node {nid} {node['type']} resized"

    # Its own bounding boxes (title bar included): no node covers another.
    boxes = sorted((nid, n["box"]) for nid, n in nodes.items())
    covered = [(nodes[a]["type"], nodes[b]["type"]) for i, (a, ra) in enumerate(boxes) for b, rb in boxes[i + 1:]
               if ra[0] < rb[0] + rb[2] and rb[0] < ra[0] + ra[2] and ra[1] < rb[1] + rb[3] and rb[1] < ra[1] + ra[3]]
    assert not covered

    # Every text box (the story's among them) shows all of its text without scrolling.
    has_story = any(n["type"] == "SDN_StoryPrompt" for n in saved.values())
    assert any(t["type"] == "SDN_StoryPrompt" for t in seen["texts"]) == has_story
    hidden = [t for t in seen["texts"] if t["shown"] <= 0 or t["needed"] > t["shown"]]
    assert not hidden

    # The pack's outputs carry the labels /object_info serves (not the names saved in the file): their own
    # names, not their types.
    object_info = json.loads(server.get("/object_info"))
    for node in nodes.values():
        if node["type"].startswith("SDN_"):
            info = object_info[node["type"]]
            assert node["outputs"] == info["output_name"], node["type"]
            assert not [label for label, kind in zip(node["outputs"], info["output"])
                        if label.lower().replace("_", " ") == kind.lower().replace("_", " ")], node["type"]

    # Everything but the missing nodes is valid: known types and combo values the server offers.
    prompt = seen["prompt"]
    known = {nid: n for nid, n in prompt.items() if int(nid) not in broken}
    assert {n["class_type"] for n in known.values()} <= set(object_info)
    assert not combo_errors(known, object_info, skip=USER_FILES)
    assert not errors

    # The frontend queues what the in-process tests convert (sdn_host.ui_to_api) and execute.
    ours = sdn_host.ui_to_api({**workflow, "nodes": [n for n in workflow["nodes"] if n["id"] not in broken]},
                              host.nodes.NODE_CLASS_MAPPINGS)
    assert {nid: (n["class_type"], n["inputs"]) for nid, n in known.items()} == \
           {nid: (n["class_type"], n["inputs"]) for nid, n in ours.items()}


@pytest.mark.parametrize("name", sorted(PAGES))
def test_workflow_queued_from_the_frontend_saves_its_pages(frontend, name):
    driver, server = frontend
    _, seen, _ = open_workflow(driver, name)
    prompt = seen["prompt"]
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            node.update(class_type="SDNTest_TinyCheckpoint", inputs={"kind": "sd15", "seed": 0})
        elif kind in ("EmptyLatentImage", "SDN_StoryBatches"):
            inputs.update(width=SIZE, height=SIZE)
        elif kind == "KSampler":
            inputs["steps"] = STEPS
        elif kind == "SDN_ComicLayout":
            inputs.update(page_width=PAGE, page_height=PAGE)
    object_info = json.loads(server.get("/object_info"))
    assert not combo_errors(prompt, object_info)  # the user's files included, now that they exist

    queued = server.json("/prompt", {"prompt": prompt, "client_id": "sdn-frontend-test"})
    assert not queued.get("node_errors"), queued
    deadline = time.monotonic() + 600
    while True:
        history = server.json(f"/history/{queued['prompt_id']}").get(queued["prompt_id"])
        if history and history["status"].get("completed") is not None:
            break
        assert time.monotonic() < deadline, "the prompt did not finish"
        time.sleep(0.5)
    assert history["status"]["status_str"] == "success", history["status"]

    (save,) = [nid for nid, n in prompt.items() if n["class_type"] == "SaveImage"]
    pages = history["outputs"][save]["images"]
    assert len(pages) == PAGES[name]
    for page in pages:
        query = urllib.parse.urlencode({k: page[k] for k in ("filename", "subfolder", "type")})
        image = np.asarray(Image.open(io.BytesIO(server.get("/view?" + query))).convert("RGB"))
        assert image.shape == (PAGE, PAGE, 3) and image.std() > 5  # panels and borders drawn


# The template browser of the pinned frontend lists /workflow_templates and shows a custom node pack's template
# with the image at api/workflow_templates/<pack folder>/<name>.jpg (mediaSubtype "jpg"), in an <img>.
THUMBNAIL = """
const [url, done] = arguments;
const img = new Image();
img.onload = () => done([img.naturalWidth, img.naturalHeight]);
img.onerror = () => done(null);
img.src = url;
"""


def test_template_browser_shows_every_workflow_with_its_thumbnail(frontend):
    driver, server = frontend
    names = sorted(Path(n).stem for n in WORKFLOWS)
    assert sorted(server.json("/workflow_templates")["comfyui-storydiffusion-native"]) == names
    for name in names:
        path = REPO / "workflows" / f"{name}.jpg"
        url = f"api/workflow_templates/comfyui-storydiffusion-native/{name}.jpg"
        assert server.get("/" + url) == path.read_bytes()
        with Image.open(path) as img:
            assert driver.execute_async_script(THUMBNAIL, url) == list(img.size), f"the page cannot show {url}"

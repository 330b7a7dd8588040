"""The page at / in a real browser: Debian's chromium driven by Playwright, against a real uvicorn.

Skips (with the reason) where Playwright or the ``chromium`` package is not installed; CI installs
chromium in .ci/run when it can. The screenshot lands in the test's tmp folder, or in
$VISTUNE_SCREENSHOT_DIR when set (to look at it).
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from test_serve import backbone, perturb
from vistune import attach
from vistune.dense.model import build_dense_model, save_dense

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
import uvicorn

from vistune.serve.app import create_app
from vistune.serve.multitask import MultiTaskModel

CHROMIUM = os.environ.get("VISTUNE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scene(path: Path) -> Path:
    """A picture with shapes (so overlays and boxes have something to sit on)."""
    rng = np.random.default_rng(0)
    im = Image.fromarray((rng.integers(90, 140, (120, 180, 3))).astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.rectangle([20, 25, 80, 95], fill=(200, 40, 40))
    d.ellipse([100, 30, 165, 100], fill=(40, 160, 60))
    im.save(path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no chromium at {CHROMIUM} (Debian: apt-get install chromium; or set VISTUNE_CHROMIUM)")
    root = tmp_path_factory.mktemp("browser")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    mt = MultiTaskModel(backbone("test_vit", 64))
    cls = attach(backbone("test_vit", 64), "lora", num_classes=4)
    perturb(cls.tuned_parameters(), 1)
    mt.add_task("flowers", cls.save_tuned(root / "cls.safetensors",
                                          extra={"class_names": ["daisy", "rose", "tulip", "sunflower"]}))
    for i, (name, method, task) in enumerate((("street", "vpt", "segment"), ("people", "linear", "detect"))):
        model = build_dense_model(attach(backbone("test_vit", 64), method, **({"length": 4} if method == "vpt" else {})),
                                  task, 3)
        perturb(model.trainable_parameters(), 5 + i)
        save_dense(model.eval(), root / name, extra={"class_names": ["road", "car", "tree"] if task == "segment"
                                                     else ["bg", "person", "bike"]})
        mt.add_task(name, root / name)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(mt), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        if time.time() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", root
    srv.should_exit = True
    thread.join(timeout=10)


def test_page_shows_every_tasks_prediction(server, tmp_path):
    import httpx

    url, _ = server
    picture = _scene(tmp_path / "scene.png")
    api = httpx.post(f"{url}/predict", files={"file": ("scene.png", picture.read_bytes(), "image/png")}).json()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_selector('.card[data-task="people"]')
            assert "test_vit" in page.inner_text("#backbone") and "3 tasks" in page.inner_text("#backbone")

            page.set_input_files("#file", str(picture))
            page.wait_for_function("document.querySelectorAll('.card[data-state=done]').length === 3")
            # classification: the bars are the API's top-k, in order
            labels = page.eval_on_selector_all('.card[data-task="flowers"] .row', "rs => rs.map(r => r.dataset.label)")
            assert labels == [t["label"] for t in api["results"]["flowers"]["top"]]
            # segmentation: image + overlay drawn (many colours), a legend of the classes present
            colours = page.evaluate("""() => {
                const c = document.querySelector('.card[data-task="street"] canvas');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                const seen = new Set();
                for (let i = 0; i < d.length; i += 4) seen.add(d[i] + ',' + d[i + 1] + ',' + d[i + 2]);
                return seen.size;
            }""")
            assert colours > 50
            legend = page.eval_on_selector_all('.card[data-task="street"] .legend li', "ls => ls.map(l => l.dataset.label)")
            assert legend == [f["label"] for f in api["results"]["street"]["fractions"]]
            # detection: as many boxes as the API returns at the same threshold
            shown = page.get_attribute('.card[data-task="people"] [data-boxes]', "data-boxes")
            assert int(shown) == len(api["results"]["people"]["boxes"])

            # lowering the score threshold re-asks the server and draws the boxes it returns
            low = httpx.post(f"{url}/predict", files={"file": ("scene.png", picture.read_bytes(), "image/png")},
                             data={"task": "people", "score_threshold": "0.05"}).json()["results"]["people"]["boxes"]
            page.fill("#threshold", "0.05")
            page.dispatch_event("#threshold", "change")
            page.wait_for_selector('.card[data-task="people"] [data-boxes]:not([data-boxes="0"])')
            page.wait_for_function("document.querySelectorAll('.card[data-state=done]').length === 3")
            assert int(page.get_attribute('.card[data-task="people"] [data-boxes]', "data-boxes")) == len(low) > 0

            shot = tmp_path / "page.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("VISTUNE_SCREENSHOT_DIR"):
                shutil.copy(shot, Path(os.environ["VISTUNE_SCREENSHOT_DIR"]) / "serve-page.png")
            with Image.open(shot) as im:
                assert im.size[0] == 1280

            # a file that is not an image: one clear message, and the page keeps working
            bad = tmp_path / "notes.txt"
            bad.write_text("not a picture")
            page.set_input_files("#file", str(bad))
            page.wait_for_selector("#status.error")
            assert "not an image" in page.inner_text("#status")

            # drag and drop works too
            data = base64.b64encode(picture.read_bytes()).decode()
            dt = page.evaluate_handle("""(b64) => {
                const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                const dt = new DataTransfer();
                dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
                return dt;
            }""", data)
            page.dispatch_event("#drop", "drop", {"dataTransfer": dt})
            page.wait_for_function("document.querySelectorAll('.card[data-state=done]').length === 3")
            assert not page.is_visible("#status.error") and "dropped.png" in page.inner_text("#drop")
            assert errors == []
        finally:
            browser.close()

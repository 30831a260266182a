"""The webcam page in headless Chromium, fed by a fake camera (a .y4m file written here), against the real app.

Needs the Debian packages ``chromium`` and ``chromium-driver`` and the ``selenium`` package (dev extra); skipped
otherwise. The app runs in-process under uvicorn (a thread, port chosen by the OS) with a fake detector that finds
the bright "heads" of the synthetic scene, so the test is about the page: camera -> upload -> boxes drawn.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from app.main import create_app
from app.settings import Settings
from detector import Detections
from detector.detector_group import DetectorGroup

CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
CHROMEDRIVER = Path(shutil.which("chromedriver") or "/usr/bin/chromedriver")
APT_HINT = "apt-get install -y chromium chromium-driver"

if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
    pytest.skip(f"headless Chromium not installed (needs {CHROMIUM} and {CHROMEDRIVER}: {APT_HINT})",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[dev]')")
uvicorn = pytest.importorskip("uvicorn")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow

WIDTH, HEIGHT, FRAMES = 640, 480, 6
# The scene's heads (cx, cy, radius) in camera pixels; they stay put so every answer has the same boxes.
HEADS = [(200, 190, 60), (450, 215, 45)]
BOX_GREEN_BGR = (113, 204, 46)  # #2ecc71, the page's box colour


def scene_yuv420(index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frame ``index`` as I420 planes: a dim room, two bodies, two bright heads, a little flicker."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    luma = 40 + 40 * yy / HEIGHT + 3 * np.sin(xx / 23 + index)  # gradient + a moving ripple, never bright
    for cx, cy, r in HEADS:
        body = (np.abs(xx - cx) < 1.4 * r) & (yy > cy + 1.1 * r)
        luma[body] = 95
        luma[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = 225
    u = np.full((HEIGHT // 2, WIDTH // 2), 140, np.uint8)  # a bluish tint
    v = np.full((HEIGHT // 2, WIDTH // 2), 120, np.uint8)
    return np.clip(luma, 0, 255).astype(np.uint8), u, v


def write_y4m(path: Path, frames: int = FRAMES, fps: int = 10) -> None:
    """A YUV4MPEG2 (4:2:0) file, the format Chromium's fake capture device reads (it loops the file)."""
    with path.open("wb") as f:
        f.write(f"YUV4MPEG2 W{WIDTH} H{HEIGHT} F{fps}:1 Ip A1:1 C420\n".encode("ascii"))
        for i in range(frames):
            f.write(b"FRAME\n")
            for plane in scene_yuv420(i):
                f.write(plane.tobytes())


class BrightBlobDetector:
    """Finds bright blobs (the scene's heads): deterministic, fast, and independent of any weights."""

    name = "bright_blobs"
    class_names = ("head",)

    def __init__(self) -> None:
        self.frame_sizes: list[tuple[int, int]] = []

    def __call__(self, image_bgr, score_threshold=None, max_detections=None) -> Detections:
        h, w = image_bgr.shape[:2]
        self.frame_sizes.append((w, h))
        gray = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2GRAY)
        n, _, stats, _ = cv2.connectedComponentsWithStats((gray > 170).astype(np.uint8))
        boxes = [[x, y, x + bw, y + bh] for x, y, bw, bh, area in stats[1:n] if area > 200]
        boxes.sort(key=lambda b: b[0])
        dets = Detections(np.array(boxes, np.float32).reshape(-1, 4), [0.9] * len(boxes), [1] * len(boxes),
                          self.class_names, (w, h))
        return dets.filter(min_score=score_threshold or 0.0).select(slice(0, max_detections))


class CentreFaceDetector(BrightBlobDetector):
    """A stand-in face model: the central half of each bright blob, labelled ``face``."""

    name = "centre_faces"
    class_names = ("face",)

    def __call__(self, image_bgr, score_threshold=None, max_detections=None) -> Detections:
        heads = super().__call__(image_bgr, score_threshold, max_detections)
        b = heads.boxes_xyxy
        quarter = np.stack([(b[:, 2] - b[:, 0]) / 4, (b[:, 3] - b[:, 1]) / 4] * 2, axis=1) * [1, 1, -1, -1]
        return Detections(b + quarter, heads.scores, heads.labels, self.class_names, heads.image_size)


@pytest.fixture(scope="module")
def fake_detector() -> BrightBlobDetector:
    return BrightBlobDetector()


@pytest.fixture(scope="module")
def fake_faces() -> CentreFaceDetector:
    return CentreFaceDetector()


@pytest.fixture(scope="module")
def server_url(fake_detector, fake_faces):
    """The real app (a head and a face model; heads by default) under uvicorn on 127.0.0.1 and a free port, in a
    background thread."""
    group = DetectorGroup([fake_detector, fake_faces])
    config = uvicorn.Config(create_app(Settings(), detector=group), host="127.0.0.1", port=0,
                            log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chromium")
    camera = tmp / "camera.y4m"
    write_y4m(camera)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-video-capture={camera}",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
        "--autoplay-policy=no-user-gesture-required", "--window-size=1000,720",
        f"--user-data-dir={tmp / 'profile'}",
    ):
        options.add_argument(arg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(15)
    yield driver
    driver.quit()


def _js(driver, script: str):
    return driver.execute_script(script)


def test_page_draws_boxes_for_the_fake_camera(browser, server_url, fake_detector, tmp_path):
    browser.get(server_url)
    drawn = ("const c = document.getElementById('view');"
             "return !!(window.lastResult && window.lastResult.count > 0 && Number(c.dataset.boxesDrawn) > 0);")
    try:
        WebDriverWait(browser, 20, poll_frequency=0.1).until(lambda d: _js(d, drawn))
    except Exception:
        message = _js(browser, "return document.getElementById('message').textContent")
        pytest.fail(f"no boxes drawn within 20 s; page message: {message!r}; stats: "
                    f"{_js(browser, 'return window.webcamStats')}")

    result = _js(browser, "return window.lastResult")
    assert result["model"] == "bright_blobs" and result["count"] == len(HEADS)
    assert (result["image_width"], result["image_height"]) == (WIDTH, HEIGHT)  # the page sends <= 640 px wide
    assert set(fake_detector.frame_sizes) == {(WIDTH, HEIGHT)}
    for (cx, cy, r), det in zip(HEADS, result["detections"]):
        x0, y0, x1, y1 = det["box_xyxy"]
        assert abs((x0 + x1) / 2 - cx) < 6 and abs((y0 + y1) / 2 - cy) < 6 and abs((x1 - x0) - 2 * r) < 10
    assert browser.find_element("id", "count").text == str(len(HEADS))
    stats = _js(browser, "return window.webcamStats")
    assert stats["errors"] == 0 and stats["boxesDrawnTotal"] > 0
    assert _js(browser, "return document.getElementById('message').hidden") is True

    # Where the page says it drew: the canvas's on-screen box and how the video fits inside it.
    geometry = _js(browser, """
        const c = document.getElementById('view'), v = document.getElementById('video');
        const r = c.getBoundingClientRect();
        return {left: r.left, top: r.top, width: r.width, height: r.height,
                vw: v.videoWidth, vh: v.videoHeight, dpr: window.devicePixelRatio};""")
    shot_path = tmp_path / "webcam.png"
    assert browser.save_screenshot(str(shot_path))
    print(f"screenshot: {shot_path}")
    if os.environ.get("RNNPOOL_WEBCAM_SCREENSHOT"):
        shutil.copy(shot_path, os.environ["RNNPOOL_WEBCAM_SCREENSHOT"])
    shot = cv2.imread(str(shot_path))
    assert shot is not None

    # Every box's edges are green in the screenshot, at the detection's place scaled to the displayed size.
    dpr = geometry["dpr"]
    cw, ch = geometry["width"] * dpr, geometry["height"] * dpr
    scale = min(cw / geometry["vw"], ch / geometry["vh"])
    ox = geometry["left"] * dpr + (cw - geometry["vw"] * scale) / 2
    oy = geometry["top"] * dpr + (ch - geometry["vh"] * scale) / 2
    sx = geometry["vw"] * scale / result["image_width"]
    green = np.all(np.abs(shot.astype(int) - BOX_GREEN_BGR) < 40, axis=-1)
    for det in result["detections"]:
        x0, y0, x1, y1 = det["box_xyxy"]
        left, top = int(ox + x0 * sx), int(oy + y0 * sx)
        right, bottom = int(ox + x1 * sx), int(oy + y1 * sx)
        mid_x, mid_y = (left + right) // 2, (top + bottom) // 2
        for x, y in ((mid_x, top), (mid_x, bottom), (left, mid_y), (right, mid_y)):
            assert green[y - 3: y + 4, x - 3: x + 4].any(), f"no box edge drawn near ({x}, {y})"
    # ... and not all over the place (the scene has no green).
    assert green.mean() < 0.05


def test_class_choice_switches_to_faces(browser, server_url, fake_faces):
    browser.get(server_url)
    options = "return [...document.getElementById('classes').options].map((o) => [o.value, o.text]);"
    WebDriverWait(browser, 10, poll_frequency=0.1).until(lambda d: len(_js(d, options)) == 3)
    assert _js(browser, options) == [["head", "heads"], ["face", "faces"], ["head,face", "heads + faces"]]
    _js(browser, "const s = document.getElementById('classes'); s.value = 'face';")
    faces = "const r = window.lastResult; return !!(r && r.counts && 'face' in r.counts && r.count > 0);"
    WebDriverWait(browser, 20, poll_frequency=0.1).until(lambda d: _js(d, faces))
    result = _js(browser, "return window.lastResult")
    assert result["model"] == "centre_faces" and result["counts"] == {"face": len(HEADS)}
    assert {d["label"] for d in result["detections"]} == {"face"}
    assert browser.find_element("id", "count-label").text == "faces"
    _js(browser, "const s = document.getElementById('classes'); s.value = 'head,face';")
    both = "const r = window.lastResult; return !!(r && r.counts && 'head' in r.counts && 'face' in r.counts);"
    WebDriverWait(browser, 20, poll_frequency=0.1).until(lambda d: _js(d, both))
    result = _js(browser, "return window.lastResult")
    assert result["counts"] == {"head": len(HEADS), "face": len(HEADS)}
    assert result["model"] == "bright_blobs+centre_faces"


def _with_stub(driver, url: str, stub_js: str) -> str:
    """Loads ``url`` with ``stub_js`` run before the page's scripts; returns the message shown."""
    script = driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": stub_js})
    try:
        driver.get(url)
        shown = "const m = document.getElementById('message'); return m.hidden ? '' : m.textContent;"
        WebDriverWait(driver, 10, poll_frequency=0.1).until(lambda d: _js(d, shown))
        return _js(driver, shown)
    finally:
        driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]})


def test_camera_denied_shows_a_message(browser, server_url):
    text = _with_stub(browser, server_url, """
        navigator.mediaDevices.getUserMedia = () =>
            Promise.reject(new DOMException("Permission denied", "NotAllowedError"));""")
    assert "denied" in text and "Allow the camera" in text
    assert browser.find_element("id", "toggle").text == "Start"


def test_insecure_page_explains_https(browser, server_url):
    # What a phone sees on http://<lan-ip>: no secure context, so no navigator.mediaDevices at all.
    text = _with_stub(browser, server_url, """
        Object.defineProperty(window, "isSecureContext", {get: () => false});
        Object.defineProperty(Navigator.prototype, "mediaDevices", {get: () => undefined});""")
    assert "https://" in text and "localhost" in text

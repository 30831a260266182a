// Webcam page: camera -> canvas, frames -> POST /detect (one request in flight), boxes drawn over the video.
// For tests: window.lastResult is the latest /detect JSON, window.webcamStats counts requests and boxes, and the
// canvas carries data-boxes-drawn (boxes in the last painted frame) and data-frames-drawn.
"use strict";

(() => {
  const SEND_WIDTH = 640; // frames are downscaled to this width before upload
  const JPEG_QUALITY = 0.8;
  const RETRY_MS = 1000;
  const KEY_STORAGE = "rnnpool-api-key";

  const $ = (id) => document.getElementById(id);
  const video = $("video");
  const canvas = $("view");
  const ctx = canvas.getContext("2d");
  const stage = $("stage");
  const message = $("message");
  const slider = $("threshold");
  const toggle = $("toggle");
  const switchButton = $("switch");
  const keyInput = $("api-key");
  const classSelect = $("classes");
  const CLASS_COLOURS = { head: "#2ecc71", face: "#ff8c00" };

  const state = {
    running: false,
    stream: null,
    facing: "environment", // the back camera on phones
    result: null,
    messageKind: null, // "camera" | "api" | null
    fps: null,
    lastDone: 0,
    loopId: 0,
  };
  const stats = { requests: 0, errors: 0, boxesDrawnTotal: 0, framesDrawn: 0 };
  window.lastResult = null;
  window.webcamStats = stats;

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function showMessage(text, kind) {
    message.textContent = text;
    message.hidden = false;
    state.messageKind = kind;
  }

  function clearMessage(kind) {
    if (kind === undefined || state.messageKind === kind) {
      message.hidden = true;
      message.textContent = "";
      state.messageKind = null;
    }
  }

  // ------------------------------------------------------------------------------------------- camera

  function cameraErrorMessage(err) {
    const name = err && err.name;
    if (!window.isSecureContext || name === "InsecureContext") {
      return "The camera only works on secure pages. Open this page over https:// or on http://localhost " +
        "(browsers block the camera on plain http:// from another device, such as a phone).";
    }
    switch (name) {
      case "NotAllowedError":
      case "SecurityError":
        return "Camera access was denied. Allow the camera for this site in the browser settings, " +
          "then reload the page.";
      case "NotFoundError":
      case "OverconstrainedError":
        return "No camera was found on this device.";
      case "NotReadableError":
      case "AbortError":
        return "The camera could not be started: is another app using it?";
      case "Unsupported":
        return "This browser cannot access a camera (no navigator.mediaDevices.getUserMedia).";
      default:
        return `Could not open the camera: ${(err && err.message) || err}`;
    }
  }

  async function openCamera(facing) {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      const err = new Error("getUserMedia unavailable");
      err.name = window.isSecureContext ? "Unsupported" : "InsecureContext";
      throw err;
    }
    const video = { facingMode: { ideal: facing }, width: { ideal: 1280 }, height: { ideal: 720 } };
    try {
      return await navigator.mediaDevices.getUserMedia({ audio: false, video });
    } catch (err) {
      if (err.name === "NotAllowedError" || err.name === "SecurityError") throw err;
      // Some devices reject the constraints: any camera will do.
      return await navigator.mediaDevices.getUserMedia({ audio: false, video: true });
    }
  }

  async function updateSwitchButton() {
    try {
      const devices = await navigator.mediaDevices.enumerateDevices();
      switchButton.hidden = devices.filter((d) => d.kind === "videoinput").length < 2;
    } catch {
      switchButton.hidden = true;
    }
  }

  async function start() {
    clearMessage("camera");
    let stream;
    try {
      stream = await openCamera(state.facing);
    } catch (err) {
      showMessage(cameraErrorMessage(err), "camera");
      setRunning(false);
      return;
    }
    state.stream = stream;
    video.srcObject = stream;
    try {
      await video.play();
    } catch {
      // Autoplay of a muted inline video is allowed nearly everywhere; the frames still arrive.
    }
    setRunning(true);
    updateSwitchButton();
    requestAnimationFrame(render);
    detectLoop(++state.loopId);
  }

  function stop() {
    setRunning(false);
    if (state.stream) state.stream.getTracks().forEach((t) => t.stop());
    state.stream = null;
    video.srcObject = null;
  }

  function setRunning(running) {
    state.running = running;
    toggle.textContent = running ? "Stop" : "Start";
  }

  // ------------------------------------------------------------------------------------------- drawing

  function render() {
    if (!state.running) return;
    requestAnimationFrame(render);
    const vw = video.videoWidth;
    const vh = video.videoHeight;
    if (!vw || !vh) return;
    stage.style.aspectRatio = `${vw} / ${vh}`;

    // Backing store at the displayed size (times the pixel ratio) so boxes stay sharp.
    const dpr = window.devicePixelRatio || 1;
    const rect = canvas.getBoundingClientRect();
    const cw = Math.max(1, Math.round(rect.width * dpr));
    const ch = Math.max(1, Math.round(rect.height * dpr));
    if (canvas.width !== cw || canvas.height !== ch) {
      canvas.width = cw;
      canvas.height = ch;
    }

    // Fit the video inside the canvas (letterbox if the shapes differ).
    const s = Math.min(cw / vw, ch / vh);
    const dw = vw * s;
    const dh = vh * s;
    const ox = (cw - dw) / 2;
    const oy = (ch - dh) / 2;
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, cw, ch);
    ctx.drawImage(video, ox, oy, dw, dh);

    let drawn = 0;
    const r = state.result;
    if (r && r.image_width > 0 && r.image_height > 0) {
      // Boxes are in pixels of the uploaded frame, which is the whole video frame downscaled.
      const sx = dw / r.image_width;
      const sy = dh / r.image_height;
      ctx.lineWidth = Math.max(2, 2 * dpr);
      ctx.font = `${Math.round(12 * dpr)}px system-ui, sans-serif`;
      ctx.textBaseline = "bottom";
      for (const d of r.detections) {
        const [x0, y0, x1, y1] = d.box_xyxy;
        const colour = CLASS_COLOURS[d.label] || "#3498db";
        ctx.strokeStyle = colour;
        ctx.fillStyle = colour;
        const x = ox + x0 * sx;
        const y = oy + y0 * sy;
        ctx.strokeRect(x, y, (x1 - x0) * sx, (y1 - y0) * sy);
        ctx.fillText(d.score.toFixed(2), x + 2, Math.max(y - 2, 12 * dpr));
        drawn += 1;
      }
    }
    stats.framesDrawn += 1;
    stats.boxesDrawnTotal += drawn;
    canvas.dataset.boxesDrawn = String(drawn);
    canvas.dataset.framesDrawn = String(stats.framesDrawn);
  }

  // ------------------------------------------------------------------------------------------- detection

  function grabFrame(grab, gctx) {
    const vw = video.videoWidth;
    const vh = video.videoHeight;
    const w = Math.min(SEND_WIDTH, vw);
    const h = Math.max(1, Math.round((vh * w) / vw));
    grab.width = w;
    grab.height = h;
    gctx.drawImage(video, 0, 0, w, h);
    return new Promise((resolve) => grab.toBlob(resolve, "image/jpeg", JPEG_QUALITY));
  }

  function apiErrorMessage(status, body) {
    const detail = body && body.error ? body.error.message : `HTTP ${status}`;
    if (status === 401) {
      $("key-box").open = true;
      return "This server needs an API key: enter it under \u201cAPI key\u201d.";
    }
    if (status === 503) return `The server has no model loaded: ${detail}`;
    return `Detection failed: ${detail}`;
  }

  async function detectLoop(loopId) {
    const grab = document.createElement("canvas");
    const gctx = grab.getContext("2d");
    // One request in flight: the next frame is grabbed only after the previous answer arrived.
    while (state.running && loopId === state.loopId) {
      if (document.hidden || !video.videoWidth) {
        await sleep(200);
        continue;
      }
      const blob = await grabFrame(grab, gctx);
      if (!blob) {
        await sleep(200);
        continue;
      }
      const headers = { "Content-Type": "image/jpeg" };
      const key = keyInput.value.trim();
      if (key) headers["X-API-Key"] = key;
      const threshold = Number(slider.value).toFixed(2);
      const started = performance.now();
      stats.requests += 1;
      try {
        const classes = classSelect.value ? `&classes=${encodeURIComponent(classSelect.value)}` : "";
        const resp = await fetch(`detect?threshold=${threshold}${classes}`, { method: "POST", headers, body: blob });
        const body = await resp.json().catch(() => null);
        if (!resp.ok || !body) {
          stats.errors += 1;
          showMessage(apiErrorMessage(resp.status, body), "api");
          await sleep(RETRY_MS);
          continue;
        }
        if (!state.running || loopId !== state.loopId) break;
        clearMessage("api");
        state.result = body;
        window.lastResult = body;
        updateStats(body, performance.now() - started);
      } catch (err) {
        stats.errors += 1;
        showMessage(`Cannot reach the server (${err.message}); retrying…`, "api");
        await sleep(RETRY_MS);
      }
    }
  }

  function updateStats(result, latencyMs) {
    const now = performance.now();
    if (state.lastDone) {
      const fps = 1000 / Math.max(1, now - state.lastDone);
      state.fps = state.fps === null ? fps : 0.8 * state.fps + 0.2 * fps;
      $("fps").textContent = state.fps.toFixed(1);
    }
    state.lastDone = now;
    const counts = result.counts || {};
    const names = Object.keys(counts);
    $("count").textContent = names.length > 1 ? names.map((n) => counts[n]).join(" / ") : String(result.count);
    $("count-label").textContent = names.length ? names.map((n) => `${n}s`).join(" / ") : "objects";
    $("latency").textContent = String(Math.round(latencyMs));
  }

  // ------------------------------------------------------------------------------------------- controls

  slider.addEventListener("input", () => {
    $("threshold-value").textContent = Number(slider.value).toFixed(2);
  });

  toggle.addEventListener("click", () => (state.running ? stop() : start()));

  switchButton.addEventListener("click", () => {
    state.facing = state.facing === "environment" ? "user" : "environment";
    stop();
    start();
  });

  try {
    keyInput.value = localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    // storage may be disabled
  }
  keyInput.addEventListener("change", () => {
    try {
      localStorage.setItem(KEY_STORAGE, keyInput.value.trim());
    } catch {
      // ignore
    }
  });

  // One choice per class the server detects, plus "all" when there are several; the server's default first.
  function fillClassChoices(classes, defaults) {
    if (!classes.length) return;
    const choices = [];
    const add = (value, text) => {
      if (!choices.some((c) => c.value === value)) choices.push({ value, text });
    };
    add(defaults.join(","), defaults.map((c) => `${c}s`).join(" + "));
    for (const c of classes) add(c, `${c}s`);
    if (classes.length > 1) add(classes.join(","), classes.map((c) => `${c}s`).join(" + "));
    classSelect.replaceChildren(...choices.map(({ value, text }) => new Option(text, value)));
  }

  async function loadVersion() {
    try {
      const v = await (await fetch("version")).json();
      $("model").textContent = v.model ? `${v.model} \u00b7 ${v.backend} \u00b7 v${v.version}` : "model not loaded";
      fillClassChoices(v.classes || [], v.default_classes || []);
      if (typeof v.default_threshold === "number") {
        slider.value = String(v.default_threshold);
        $("threshold-value").textContent = Number(slider.value).toFixed(2);
      }
    } catch {
      $("model").textContent = "server unreachable";
    }
  }

  loadVersion();
  start();
})();

// The page of `causal-dit serve`: one WebSocket; JSON control messages out, JSON status messages and
// binary JPEG frames in (drawn on the canvas as each arrives). No libraries.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const canvas = $("screen");
  const ctx = canvas.getContext("2d");
  let ws = null;
  let playing = false;
  let paused = false;
  let received = 0;
  let current = ""; // the prompt the frames now follow
  let drawing = Promise.resolve(); // frames are decoded and drawn one after another, in order

  function setText(id, text) { $(id).textContent = text; }
  function showError(message) {
    const el = $("error");
    el.textContent = message;
    el.hidden = !message;
  }
  function setPlaying(on) {
    playing = on;
    if (!on) paused = false;
    $("start").disabled = on;
    $("pause").disabled = !on;
    $("stop").disabled = !on;
    $("switch").disabled = !on;
    $("pause").textContent = paused ? "Resume" : "Pause";
  }
  function seconds(s) { return s == null ? "–" : `${s.toFixed(2)} s`; }
  function rate(r) { return r == null ? "–" : `${r.toFixed(1)} frames/s`; }
  function whole(id) {
    const text = $(id).value.trim();
    return text === "" ? undefined : Number(text);
  }
  function send(message) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(message));
    else showError("not connected to the server");
  }

  const SWITCH_MODES = {
    recache: "re-cache the recent frames",
    cut: "cut to the new prompt",
    keep: "keep the old cache",
  };

  function configure(hello) {
    const select = $("decoder");
    select.replaceChildren(...hello.decoders.map((d) => new Option(d, d)));
    $("switch-mode").replaceChildren(
      ...hello.switch_modes.map((m) => new Option(SWITCH_MODES[m] || m, m, m === hello.switch, m === hello.switch)),
    );
    const counts = hello.frame_counts;
    const frames = $("frames");
    if (counts.length) {
      frames.min = counts[0];
      frames.max = counts[counts.length - 1];
      frames.step = counts.length > 1 ? counts[1] - counts[0] : 1;
    }
    if (!frames.dataset.touched) frames.value = hello.frames;
    const fps = $("fps");
    fps.max = hello.max_fps;
    if (!fps.dataset.touched) fps.value = hello.model_fps;
    $("prompt").maxLength = hello.max_prompt_length;
    canvas.width = hello.width;
    canvas.height = hello.height;
    const some = counts.slice(0, 4).join(", ");
    $("hint").textContent =
      `${hello.width}x${hello.height}, ${hello.model_fps} fps; frames: ${some}${counts.length > 4 ? ", …" : ""}` +
      (hello.untrained ? " (untrained weights: the video will not show the prompt)" : "");
  }

  function onStatus(m, opened) {
    switch (m.type) {
      case "hello":
        configure(m);
        setText("state", "ready");
        opened(true);
        break;
      case "busy":
        showError(m.message);
        setText("state", "busy");
        opened(false);
        break;
      case "error":
        showError(m.message);
        break;
      case "started":
        showError("");
        received = 0;
        setText("received", "0");
        setText("buffered", "0");
        setText("dropped", "0");
        setText("latency", "–");
        setText("gen-fps", "–");
        $("download").hidden = true;
        canvas.width = m.width;
        canvas.height = m.height;
        setPlaying(true);
        current = m.prompt;
        setText("state", `playing: ${current}`);
        break;
      case "first_frame":
        setText("latency", seconds(m.latency_s));
        break;
      case "stats":
        setText("buffered", String(m.buffered));
        setText("dropped", String(m.dropped));
        setText("gen-fps", rate(m.fps));
        break;
      case "prompt":
        setText("state", `switching to: ${m.prompt}`);
        break;
      case "switched":
        current = m.prompt;
        setText("state", `playing: ${current}`);
        break;
      case "paused":
        paused = true;
        setPlaying(true);
        setText("state", "paused");
        break;
      case "resumed":
        paused = false;
        setPlaying(true);
        setText("state", `playing: ${current}`);
        break;
      case "done": {
        setPlaying(false);
        setText("state", m.reason === "finished" ? `done: ${m.frames} frames` : `${m.reason} after ${m.frames} frames`);
        setText("buffered", "0");
        setText("dropped", String(m.dropped));
        if (m.first_frame_s != null) setText("latency", seconds(m.first_frame_s));
        if (m.fps != null) setText("gen-fps", rate(m.fps));
        const link = $("download");
        if (m.video) {
          link.href = `${m.video}?v=${Date.now()}`;
          link.hidden = false;
        }
        break;
      }
      default:
        break;
    }
  }

  function onFrame(blob) {
    received += 1;
    setText("received", String(received));
    drawing = drawing
      .then(() => createImageBitmap(blob))
      .then((bitmap) => {
        ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
        bitmap.close();
      })
      .catch((e) => showError(`a frame could not be drawn: ${e}`));
  }

  function connect() {
    return new Promise((resolve) => {
      const scheme = location.protocol === "https:" ? "wss://" : "ws://";
      const socket = new WebSocket(`${scheme}${location.host}/ws`);
      socket.binaryType = "blob";
      ws = socket;
      let settled = false;
      const opened = (ok) => { if (!settled) { settled = true; resolve(ok); } };
      socket.onmessage = (ev) => {
        if (typeof ev.data === "string") onStatus(JSON.parse(ev.data), opened);
        else onFrame(ev.data);
      };
      socket.onclose = () => {
        if (ws === socket) ws = null;
        setPlaying(false);
        if ($("state").textContent !== "busy") setText("state", "disconnected");
        opened(false);
      };
    });
  }

  async function start(event) {
    event.preventDefault();
    if (!ws || ws.readyState !== WebSocket.OPEN) {
      showError("");
      if (!(await connect())) return;
    }
    $("download").hidden = true;
    send({
      type: "start",
      prompt: $("prompt").value,
      seed: whole("seed"),
      frames: whole("frames"),
      fps: whole("fps"),
      decoder: $("decoder").value || undefined,
      switch: $("switch-mode").value || undefined,
    });
  }

  $("controls").addEventListener("submit", start);
  $("stop").addEventListener("click", () => send({ type: "stop" }));
  $("pause").addEventListener("click", () => send({ type: paused ? "resume" : "pause" }));
  $("switch").addEventListener("click", () => send({ type: "prompt", prompt: $("prompt").value }));
  for (const id of ["frames", "fps"]) $(id).addEventListener("input", () => { $(id).dataset.touched = "1"; });
  setPlaying(false);
  connect();
})();

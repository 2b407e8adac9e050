// The musicbridge panel: state pushed over one WebSocket, controls sent back as OSC messages.
// Plain JS and canvas, nothing from the network. Elements carry data-* attributes with what they
// show, so the tests (and a curious user) can read the page's state without parsing pixels.
"use strict";

const QUERY = document.body.dataset.query;          // token=...(&key=...), templated by the server
const state = { parts: {}, seen: {} };
window.panelSeen = state.seen;                        // job id -> progress fractions drawn, in order
const PITCH = "0123456789ab";
const NAMES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"];

function $(id) { return document.getElementById(id); }
function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k);
  return e;
}
function url(path, extra = "") { return `${path}?${QUERY}${extra}`; }
function fmt(v, digits = 2) { return v === null || v === undefined ? "-" : Number(v).toFixed(digits); }
function secs(v) {
  if (v === null || v === undefined) return "";
  if (v < 60) return `${Math.ceil(v)} s left`;
  return `${Math.floor(v / 60)} min ${Math.ceil(v % 60)} s left`;
}

// ------------------------------------------------------------------ connection

let ws = null;
function connect() {
  ws = new WebSocket(`ws://${location.host}/ws?${QUERY}`);
  ws.onopen = () => { $("conn").textContent = "live"; $("conn").className = "badge on"; };
  ws.onclose = () => {
    $("conn").textContent = "disconnected"; $("conn").className = "badge off";
    setTimeout(connect, 1000);                        // the daemon may be restarting
  };
  ws.onmessage = (ev) => {
    const m = JSON.parse(ev.data);
    if (m.type === "hello" || m.type === "state") {
      Object.assign(state.parts, m.parts);
      for (const r of m.replies || []) addReply(r);
      render(Object.keys(m.parts));
    } else if (m.type === "reply") {
      addReply(m);
    } else if (m.type === "refused") {
      addReply({ address: "panel", args: [m.reason] });
    }
  };
}

function send(address, ...args) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ address, args }));
}

function addReply(r) {
  const li = el("li", { text: `${r.address} ${r.args.map((a) => JSON.stringify(a)).join(" ")}` });
  li.dataset.address = r.address;
  if (r.address === "/error" || r.address === "panel") li.className = "error";
  const list = $("replies");
  list.prepend(li);
  while (list.children.length > 60) list.lastChild.remove();
}

// ------------------------------------------------------------------ rendering

function render(parts) {
  for (const p of parts) {
    if (p === "info") renderInfo(state.parts.info);
    if (p === "clock") renderClock(state.parts.clock);
    if (p === "tracks") renderTracks(state.parts.tracks);
    if (p === "jobs") renderJobs(state.parts.jobs);
    if (p === "jams") renderJams(state.parts.jams);
    if (p === "stems") renderStems(state.parts.stems);
  }
}

function renderInfo(info) {
  $("model").textContent = `${info.model} on ${info.device} (${info.dtype}), OSC port ${info.osc_port}` +
    (info.live_audio ? "" : ", no live audio");
  const sel = $("c-preset");
  const have = Array.from(sel.options).map((o) => o.value).slice(1).join(",");
  if (have !== info.presets.join(",")) {
    while (sel.options.length > 1) sel.remove(1);
    for (const p of info.presets) sel.append(el("option", { value: p, text: p }));
  }
}

function renderClock(c) {
  const box = $("clock");
  box.dataset.source = c.source; box.dataset.playing = c.playing ? "1" : "0";
  box.dataset.bar = c.bar; box.dataset.tempo = c.tempo;
  $("clock-source").textContent = `${c.source} leads`;
  $("clock-tempo").textContent = fmt(c.tempo, 1);
  $("clock-sig").textContent = c.signature;
  $("clock-pos").textContent = `${c.bar}:${Math.floor(c.beat)}`;
  $("clock-playing").textContent = c.playing ? "playing" : "stopped";
  $("clock-age").textContent = c.age < 0 ? "no update yet" : `updated ${fmt(c.age, 1)} s ago`;
  $("play").disabled = $("stop").disabled = !c.typed;
  $("transport-note").textContent = c.typed ? "" : `the ${c.source} clock leads: play and stop in the DAW`;
}

function renderTracks(tracks) {
  const box = $("tracks");
  box.replaceChildren();
  if (!tracks.length) box.append(el("p", { class: "dim", text: "no track yet: set a prompt or a preset" }));
  for (const t of tracks) {
    const params = Object.entries(t.params).map(([k, v]) => `${k}=${v}`).join(" ") || "default parameters";
    const roll = el("canvas", { width: 440, height: 48, class: "roll" });
    roll.dataset.notes = t.notes.map((n) => n[0]).join(",");
    const div = el("div", { class: "track" },
      el("b", { text: t.name }), " ", el("span", { text: t.prompt || "(preset prompt)" }),
      el("div", { class: "meta", text: `preset ${t.preset || "-"} · ${params} · chain ${t.chain.join(" → ") || "none"}` +
        ` · gain ${fmt(t.gain)} pan ${fmt(t.pan)} · melody ${t.melody || "none"}` +
        (t.kept ? ` · keeps #${t.kept} ${t.kept_name}` : "") }),
      roll);
    div.dataset.track = t.name; div.dataset.kept = t.kept;
    box.append(div);
    drawRoll(roll, t.notes);
  }
}

function drawRoll(cv, notes) {
  // the last 8 s of live notes, now at the right edge; rows cover the notes' range
  const g = cv.getContext("2d"), W = cv.width, H = cv.height;
  g.clearRect(0, 0, W, H);
  if (!notes.length) { g.fillStyle = "#555"; g.fillText("no live notes", 6, H / 2 + 4); return; }
  const lo = Math.min(...notes.map((n) => n[0])) - 2, hi = Math.max(...notes.map((n) => n[0])) + 2;
  const rowH = H / (hi - lo + 1);
  for (const [p, a, b] of notes) {
    const x0 = W * (1 + a / 8), x1 = W * (1 + b / 8);
    g.fillStyle = b >= 0 ? "#f2b84b" : "#4f9de0";
    g.fillRect(x0, H - (p - lo + 1) * rowH, Math.max(2, x1 - x0), Math.max(2, rowH - 1));
  }
}

function renderJobs(jobs) {
  const box = $("jobs");
  box.replaceChildren();
  if (!jobs.length) box.append(el("p", { class: "dim", text: "no job yet" }));
  for (const j of jobs) {
    const seen = state.seen[j.id] || (state.seen[j.id] = []);
    if (!seen.length || seen[seen.length - 1] !== j.fraction) seen.push(j.fraction);
    const fill = el("div"); fill.style.width = `${(100 * j.fraction).toFixed(1)}%`;
    const take = j.of > 1 ? ` take ${j.take}/${j.of}` : "";
    let what = j.state;
    if (j.state === "running") what = `running ${Math.round(100 * j.fraction)}% ${secs(j.eta)}`;
    if (j.state === "failed") what = `failed: ${j.error}`;
    if (j.state === "done") what = `done: ${j.path.split("/").pop()}`;
    const div = el("div", { class: `job ${j.state}` },
      el("span", { text: `#${j.id} ${j.track}${take}, ${fmt(j.seconds, 1)} s — ` }), el("span", { class: "state", text: what }),
      el("div", { class: "bar" }, fill));
    Object.assign(div.dataset, { job: j.id, state: j.state, fraction: j.fraction, eta: j.eta ?? "" });
    box.append(div);
  }
}

function renderJams(jams) {
  const box = $("jams");
  box.replaceChildren();
  if (!jams.length) box.append(el("p", { class: "dim", text: "no jam has run" }));
  for (const j of jams) {
    const s = j.status;
    const head = el("div", { text: `${j.track}: ${j.state}${j.behind ? " — BEHIND" : ""}, ${j.chunks} chunks, ` +
      `realtime ${fmt(s.realtime_factor)}x, chunk ${fmt(s.chunk_latency)} s, buffered ${fmt(s.buffered)} s, ` +
      `underruns ${s.underruns}, note→audio ${fmt(s.note_latency)} s${s.error ? ", error: " + s.error : ""}` });
    const meters = el("div", { class: "meters" });
    const labels = { realtime_factor: "realtime factor", chunk_latency: "chunk latency s", buffered: "buffered s",
      underruns: "underruns", behind: "behind", note_latency: "note→audio s" };
    for (const [name, values] of Object.entries(j.meters)) {
      const cv = el("canvas", { width: 150, height: 36 });
      cv.dataset.meter = name; cv.dataset.samples = values.length;
      meters.append(el("div", { class: "meter" }, el("div", { text: `${labels[name]} ${fmt(values[values.length - 1])}` }), cv));
      drawPlot(cv, values, name === "realtime_factor" ? 1 : null);
    }
    const strips = el("div", { class: "strips" });
    for (const c of j.strips) {
      const cv = el("canvas", { width: 64, height: 52 });
      Object.assign(cv.dataset, { index: c.index, condition: c.condition, output: c.output });
      drawStrip(cv, c.condition, c.output);
      strips.append(el("div", { class: "strip" }, cv, el("div", { text: `#${c.index} cos ${fmt(c.cosine)}` })));
    }
    const last = j.strips[j.strips.length - 1];
    const div = el("div", { class: "jam" }, head, meters,
      el("div", { class: "dim", text: "chroma per chunk: conditioning (top) and what came out (bottom), cosine below" }),
      strips);
    Object.assign(div.dataset, { jam: j.track, state: j.state, chunks: j.chunks,
      condition: last ? last.condition : "", samples: j.meters.realtime_factor.length });
    box.append(div);
  }
}

function drawPlot(cv, values, ref) {
  // one minute of samples, newest at the right; a dashed line at `ref` (realtime = 1)
  const g = cv.getContext("2d"), W = cv.width, H = cv.height;
  g.clearRect(0, 0, W, H);
  const v = values.map((x) => (x === null ? NaN : Number(x)));
  const finite = v.filter((x) => Number.isFinite(x));
  const top = Math.max(ref || 0, ...finite, 1e-6) * 1.1;
  if (ref) {
    g.strokeStyle = "#666"; g.setLineDash([3, 3]); g.beginPath();
    g.moveTo(0, H - H * ref / top); g.lineTo(W, H - H * ref / top); g.stroke(); g.setLineDash([]);
  }
  g.strokeStyle = "#4f9de0"; g.beginPath();
  v.forEach((x, i) => {
    if (!Number.isFinite(x)) return;
    const px = W - (v.length - 1 - i) * (W / 120), py = H - H * x / top;
    i && Number.isFinite(v[i - 1]) ? g.lineTo(px, py) : g.moveTo(px, py);
  });
  g.stroke();
}

function drawStrip(cv, condition, output) {
  // 12 pitch-class rows per half: a cell lit where that frame's pitch class is
  const g = cv.getContext("2d"), W = cv.width, H = cv.height, half = (H - 4) / 2;
  g.clearRect(0, 0, W, H);
  [[condition, 0, "#f2b84b"], [output, half + 4, "#8fd19e"]].forEach(([bins, y0, color]) => {
    if (!bins) return;
    const w = W / bins.length;
    for (let i = 0; i < bins.length; i++) {
      const k = PITCH.indexOf(bins[i]);
      if (k < 0) continue;
      g.fillStyle = color;
      g.fillRect(i * w, y0 + half - (k + 1) * half / 12, Math.max(1, w - 0.5), half / 12);
    }
  });
}

// ------------------------------------------------------------------ stems

const stemNodes = {};
function renderStems(stems) {
  const box = $("stems");
  if (!stems.length) return;
  if (box.querySelector("p")) box.replaceChildren();
  for (const s of stems) {
    if (stemNodes[s.job]) { markKept(stemNodes[s.job], s); continue; }  // never rebuilt: a playing <audio> keeps playing
    let group = box.querySelector(`[data-group="${CSS.escape(s.group)}"]`);
    if (!group) {
      group = el("div", { class: "group" }); group.dataset.group = s.group;
      box.prepend(group);
    }
    const audioUrl = url(`/stems/${s.job}/audio`);
    const dl = url(`/stems/${s.job}/audio`, "&download=1");
    const wave = el("canvas", { width: 240, height: 48, class: "wave" });
    const spec = el("canvas", { width: 240, height: 48, class: "spec" });
    const link = el("a", { href: dl, download: s.name, class: "drag", draggable: "true",
      title: "drag into your DAW (Chromium), or click to download", text: `⇩ ${s.name}` });
    const mime = s.name.endsWith(".flac") ? "audio/flac" : "audio/wav";
    // Chromium turns a DownloadURL drag into a file dropped where it lands (a DAW's timeline)
    link.addEventListener("dragstart", (ev) => {
      ev.dataTransfer.setData("DownloadURL", `${mime}:${s.name}:${new URL(dl, location.href).href}`);
    });
    const title = el("div", { text: `#${s.job} ${s.track}${s.of > 1 ? ` take ${s.take}/${s.of}` : ""}, ${s.seconds} s` });
    const card = el("div", { class: "stem" }, title, wave, spec, el("audio", { controls: "", preload: "none", src: audioUrl }), link);
    // keeping is the daemon's: the session records the track's kept take, so it outlives this page
    const keep = el("button", { class: "keep", text: "Keep this take" });
    keep.addEventListener("click", () => send(`/track/${s.track}/keep`, s.job));
    card.append(" ", keep);
    card.dataset.stem = s.job;
    markKept(card, s);
    group.append(card);
    stemNodes[s.job] = card;
    fetch(url(`/stems/${s.job}/thumb.json`)).then((r) => r.json()).then((t) => {
      drawWave(wave, t.peaks); drawSpec(spec, t.spectrogram);
      wave.dataset.drawn = "1"; wave.dataset.columns = t.peaks.length; card.dataset.seconds = t.seconds;
    });
  }
}

function markKept(card, s) {
  // as the daemon says: the kept take outlined, the other takes of its request dimmed (their files stay)
  card.classList.toggle("kept", s.kept); card.classList.toggle("set-aside", s.set_aside);
  card.dataset.kept = s.kept ? "1" : "0"; card.dataset.setAside = s.set_aside ? "1" : "0";
  const keep = card.querySelector("button.keep");
  keep.textContent = s.kept ? "Kept" : "Keep this take"; keep.disabled = s.kept;
}

function drawWave(cv, peaks) {
  const g = cv.getContext("2d"), W = cv.width, H = cv.height;
  g.clearRect(0, 0, W, H);
  g.fillStyle = "#4f9de0";
  const w = W / Math.max(1, peaks.length);
  peaks.forEach(([lo, hi], i) => {
    const y0 = H / 2 - hi * H / 2, y1 = H / 2 - lo * H / 2;
    g.fillRect(i * w, y0, Math.max(1, w), Math.max(1, y1 - y0));
  });
}

function drawSpec(cv, rows) {
  const g = cv.getContext("2d"), W = cv.width, H = cv.height;
  if (!rows.length) return;
  const img = g.createImageData(W, H), nb = rows[0].length;
  for (let x = 0; x < W; x++) {
    const row = rows[Math.floor(x * rows.length / W)];
    for (let y = 0; y < H; y++) {
      const v = row[Math.floor((H - 1 - y) * nb / H)], o = 4 * (y * W + x);
      img.data[o] = v; img.data[o + 1] = Math.max(0, v - 90) * 1.5; img.data[o + 2] = 255 - v / 2; img.data[o + 3] = 255;
    }
  }
  g.putImageData(img, 0, 0);
}

// ------------------------------------------------------------------ controls

function track() { return $("c-track").value.trim(); }
$("play").addEventListener("click", () => send("/transport/play"));
$("stop").addEventListener("click", () => send("/transport/stop"));
$("c-set-prompt").addEventListener("click", () => send(`/track/${track()}/prompt`, $("c-prompt").value));
$("c-set-preset").addEventListener("click", () => send(`/track/${track()}/preset`, $("c-preset").value));
$("c-generate").addEventListener("click", () => send(`/track/${track()}/generate`, parseInt($("c-bars").value, 10), "bars"));
$("c-jam-start").addEventListener("click", () => send("/jam/start", track()));
$("c-jam-stop").addEventListener("click", () => send("/jam/stop", track()));

connect();

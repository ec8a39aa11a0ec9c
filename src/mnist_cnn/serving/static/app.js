// The draw-a-digit page. Everything it knows comes from the server's API:
//   GET /api/model   -> name, parameters, classes, recorded test accuracy
//   POST /api/predict (multipart "image") -> label, probabilities, the 28x28 input it saw
// <body data-busy> is "true" while a prediction is scheduled or in flight (tests wait on it).
"use strict";

const DEBOUNCE_MS = 120;  // predict this long after the pen stops moving, and again when it lifts
const STROKE_PX = 22;     // on the 280 px canvas: about MNIST's 2 px strokes in its 20 px digit box

const canvas = document.getElementById("canvas");
const ctx = canvas.getContext("2d");
const seen = document.getElementById("preprocessed").getContext("2d");
const prediction = document.getElementById("prediction");
const bars = document.getElementById("probabilities");
const status = document.getElementById("status");
const upload = document.getElementById("upload");
const dropzone = document.getElementById("dropzone");

let timer = null;   // the debounced prediction, if one is scheduled
let inFlight = 0;   // requests sent (or being encoded) and not yet answered
let serial = 0;     // the newest request; older answers are dropped
let last = null;    // the pen's previous point while drawing

function setBusy() {
  document.body.dataset.busy = String(timer !== null || inFlight > 0);
}

function blank() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  seen.fillStyle = "#000";
  seen.fillRect(0, 0, 28, 28);
}

function clearAll() {
  clearTimeout(timer);
  timer = null;
  serial++;  // answers still on their way belong to the old drawing
  blank();
  prediction.textContent = "";
  delete prediction.dataset.for;
  for (const li of bars.children) showBar(li, 0, false);
  status.textContent = "";
  status.classList.remove("error");
  setBusy();
}

// --- the bar chart: one <li data-digit data-p> per class ---------------------------------
function buildBars(classes) {
  bars.replaceChildren(...classes.map((name, i) => {
    const li = document.createElement("li");
    li.dataset.digit = String(i);
    li.innerHTML = '<span class="name"></span><span class="track"><span class="fill"></span></span>' +
                   '<span class="value"></span>';
    li.querySelector(".name").textContent = name;
    showBar(li, 0, false);
    return li;
  }));
}

function showBar(li, p, top) {
  li.dataset.p = String(p);
  li.classList.toggle("top", top);
  li.querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
  li.querySelector(".value").textContent = `${(100 * p).toFixed(1)}%`;
  li.setAttribute("aria-label", `${li.querySelector(".name").textContent}: ${(100 * p).toFixed(1)} percent`);
}

// --- asking the server ---------------------------------------------------------------------
function schedule() {
  clearTimeout(timer);
  timer = setTimeout(() => { timer = null; sendCanvas(); }, DEBOUNCE_MS);
  setBusy();
}

function sendCanvas() {
  clearTimeout(timer);
  timer = null;
  inFlight++;  // counted from the encoding on, so data-busy never flickers to "false" in between
  setBusy();
  canvas.toBlob((blob) => { inFlight--; send(blob, "canvas.png"); }, "image/png");
}

async function send(blob, name) {
  const mine = ++serial;
  const form = new FormData();
  form.append("image", blob, name);
  inFlight++;
  setBusy();
  const t0 = performance.now();
  try {
    const response = await fetch("/api/predict", { method: "POST", body: form });
    const body = await response.json();
    if (mine !== serial) return;  // a newer drawing was sent meanwhile: its answer wins
    const roundTrip = performance.now() - t0;
    if (response.ok) show(body, name, serverMs(response), roundTrip);
    else showError(body.error || `HTTP ${response.status}`);
  } catch (err) {
    if (mine === serial) showError(`the server did not answer (${err.message})`);
  } finally {
    inFlight--;
    setBusy();
  }
}

function serverMs(response) {  // from "Server-Timing: predict;dur=1.23"
  const match = /dur=([\d.]+)/.exec(response.headers.get("Server-Timing") || "");
  return match ? Number(match[1]) : NaN;
}

function show(body, name, server, roundTrip) {
  prediction.textContent = body.label;
  prediction.dataset.for = name;
  body.probabilities.forEach((p, i) => showBar(bars.children[i], p, i === body.digit));
  const pixels = seen.createImageData(28, 28);
  body.preprocessed.flat().forEach((v, i) => {
    const g = Math.round(255 * v);
    pixels.data.set([g, g, g, 255], 4 * i);
  });
  seen.putImageData(pixels, 0, 0);
  status.classList.remove("error");
  status.textContent = `server ${server.toFixed(1)} ms, round trip ${roundTrip.toFixed(1)} ms`;
}

function showError(message) {
  prediction.textContent = "";
  delete prediction.dataset.for;
  status.classList.add("error");
  status.textContent = message;
}

// --- drawing with mouse, finger or pen -----------------------------------------------------
function point(event) {
  const box = canvas.getBoundingClientRect();
  return [(event.clientX - box.left) * canvas.width / box.width, (event.clientY - box.top) * canvas.height / box.height];
}

function strokeTo(p) {
  ctx.beginPath();
  ctx.moveTo(...last);
  ctx.lineTo(...p);
  ctx.stroke();
  last = p;
}

canvas.addEventListener("pointerdown", (event) => {
  canvas.setPointerCapture(event.pointerId);
  Object.assign(ctx, { lineWidth: STROKE_PX, lineCap: "round", lineJoin: "round", strokeStyle: "#000" });
  last = point(event);
  strokeTo(last);  // a dot
  schedule();
});
canvas.addEventListener("pointermove", (event) => {
  if (last === null) return;
  for (const e of event.getCoalescedEvents ? event.getCoalescedEvents() : [event]) strokeTo(point(e));
  schedule();
});
for (const type of ["pointerup", "pointercancel"]) {
  canvas.addEventListener(type, () => {
    if (last === null) return;
    last = null;
    sendCanvas();  // the pen lifted: no need to wait
  });
}
canvas.addEventListener("keydown", (event) => {
  if (["Escape", "Delete", "Backspace"].includes(event.key)) { event.preventDefault(); clearAll(); }
});

// --- pictures: the file input and drag-and-drop --------------------------------------------
async function usePicture(file) {
  clearAll();
  inFlight++;  // busy from now on, through the decoding below
  setBusy();
  try {  // show it on the canvas, so that one can draw on top; the server gets the original file
    const bitmap = await createImageBitmap(file);
    const scale = Math.min(canvas.width / bitmap.width, canvas.height / bitmap.height);
    const w = bitmap.width * scale, h = bitmap.height * scale;
    ctx.drawImage(bitmap, (canvas.width - w) / 2, (canvas.height - h) / 2, w, h);
  } catch {
    // the browser cannot decode it either: the server's answer says what is wrong
  }
  inFlight--;
  send(file, file.name);
}

upload.addEventListener("change", () => {
  if (upload.files.length) usePicture(upload.files[0]);
  upload.value = "";  // choosing the same file again is a new upload
});
dropzone.addEventListener("dragover", (event) => { event.preventDefault(); dropzone.classList.add("over"); });
dropzone.addEventListener("dragleave", () => dropzone.classList.remove("over"));
dropzone.addEventListener("drop", (event) => {
  event.preventDefault();
  dropzone.classList.remove("over");
  if (event.dataTransfer.files.length) usePicture(event.dataTransfer.files[0]);
});
document.getElementById("clear").addEventListener("click", clearAll);

// --- start ---------------------------------------------------------------------------------
async function start() {
  blank();
  try {
    const about = await (await fetch("/api/model")).json();
    buildBars(about.classes);
    const accuracy = about.test_accuracy == null ? "no recorded test accuracy"
      : `test accuracy ${(100 * about.test_accuracy).toFixed(2)}%`;
    document.getElementById("model").textContent =
      `${about.model}, ${about.parameters.toLocaleString("en")} parameters, trained on ${about.dataset}: ` +
      `${accuracy} (${about.checkpoint})`;
  } catch (err) {
    showError(`cannot reach the server (${err.message})`);
  }
}
start();

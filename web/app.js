// The page: draw or drop an image, run model.onnx in the browser, show what it answered and saw.
//
// Hooks for tests (tests/test_web.py): data-testid="canvas", "clear", "file-input", and
// "prediction", which carries data-label and data-probabilities (a JSON array in class order)
// once a prediction is shown, and data-input, the number of the input it answers (document.body
// .dataset.inputs counts the inputs: strokes, files, clears). document.body.dataset.modelReadyMs
// and firstPredictionMs record the milliseconds from navigation start.
import * as ort from "/ort/ort.wasm.min.mjs";
import { InvalidInput, preprocess, specFromBundle } from "/preprocessing.js";

// Served by python -m web from web/node_modules: the page needs no network beyond its own server.
ort.env.wasm.wasmPaths = "/ort/";
// More threads need SharedArrayBuffer (cross-origin isolation) and buy nothing for a 28x28 input.
ort.env.wasm.numThreads = 1;

const BRUSH_WIDTH = 22; // px on the 280 px canvas: about 2 px once resized to 28, like MNIST's strokes
const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const pen = canvas.getContext("2d");
let model = null; // { session, inputName, bundle, spec }
let lastInputUrl = null;
let lastBytes = null; // the latest input, classified again when the framing choice changes
// Every input (a stroke, a file, a clear) gets a number; an answer is shown only while its input
// is the latest, so a slow answer never overwrites a newer one (data-input says which it is).
let latestInput = 0;

function nextInput() {
  latestInput += 1;
  document.body.dataset.inputs = String(latestInput);
  return latestInput;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

async function loadModel() {
  const response = await fetch("/model/bundle.json");
  if (!response.ok) throw new Error(`bundle.json: HTTP ${response.status}; run make export, then reload`);
  const bundle = await response.json();
  const session = await ort.InferenceSession.create("/model/model.onnx", { executionProviders: ["wasm"] });
  const inputName = session.inputNames[0]; // asked of the model, like contract.onnx_session
  if (session.inputNames.length !== 1 || inputName !== bundle.input.name) {
    throw new Error(`the model's inputs are ${JSON.stringify(session.inputNames)}, bundle.json says ` +
      `"${bundle.input.name}": model.onnx and bundle.json come from different exports`);
  }
  return { session, inputName, bundle, spec: specFromBundle(bundle) };
}

async function run(input) {
  const { session, inputName, spec } = model;
  const tensor = new ort.Tensor("float32", input, [1, spec.channels, spec.height, spec.width]);
  const outputs = await session.run({ [inputName]: tensor });
  const logProbabilities = outputs[session.outputNames[0]].data;
  // float32, as numpy's exp of the float32 log-softmax in the edge predictor and the handler
  return Array.from(logProbabilities, (v) => Math.fround(Math.exp(v)));
}

function argmax(values) {
  return values.reduce((best, v, i) => (v > values[best] ? i : best), 0);
}

function showAnswer(element, barsElement, probabilities, input) {
  const classes = model.bundle.classes;
  const label = argmax(probabilities);
  element.textContent = `${classes[label]} (${label}), ${(100 * probabilities[label]).toFixed(1)}%`;
  element.dataset.label = String(label);
  element.dataset.probabilities = JSON.stringify(probabilities);
  element.dataset.input = String(input);
  barsElement.replaceChildren(...probabilities.flatMap((p, i) => {
    const name = document.createElement("span");
    name.textContent = classes[i];
    const bar = document.createElement("div");
    bar.className = i === label ? "bar top" : "bar";
    const fill = document.createElement("div");
    fill.style.width = `${(100 * p).toFixed(2)}%`;
    bar.append(fill);
    const value = document.createElement("span");
    value.textContent = p.toFixed(4);
    return [name, bar, value];
  }));
}

function clearAnswer(element, barsElement) {
  delete element.dataset.label;
  delete element.dataset.probabilities;
  delete element.dataset.input;
  element.textContent = "";
  barsElement.replaceChildren();
}

function showSeen(seen) {
  const { width, height } = model.spec;
  const image = new ImageData(width, height);
  seen.forEach((v, i) => image.data.set([v, v, v, 255], 4 * i));
  $("seen").getContext("2d").putImageData(image, 0, 0);
}

async function askServer(bytes, browserProbabilities, input) {
  $("server-answer").hidden = false;
  clearAnswer($("server-prediction"), $("server-bars"));
  $("server-prediction").textContent = "asking…";
  $("agreement").textContent = "";
  let response, answer;
  try {
    response = await fetch("/predict", {
      method: "POST", body: bytes,
      headers: { "Content-Type": "application/octet-stream", "X-Framing": $("framing").value },
    });
    answer = await response.json();
  } catch (error) { // the browser's own answer stands; only this side says what went wrong
    if (input === latestInput) $("server-prediction").textContent = `no answer: ${error.message}`;
    return;
  }
  if (input !== latestInput) return;
  if (!response.ok) {
    $("server-prediction").textContent = `HTTP ${response.status}: ${answer.error}`;
    return;
  }
  showAnswer($("server-prediction"), $("server-bars"), answer.probabilities, input);
  const maxDiff = Math.max(...answer.probabilities.map((p, i) => Math.abs(p - browserProbabilities[i])));
  const same = answer.label === argmax(browserProbabilities);
  $("agreement").textContent = `max |dp| ${maxDiff.toExponential(1)}, ${same ? "same" : "DIFFERENT"} class`;
}

function describeFraming(report) {
  if (!report.applied) return `not framed (${report.reason})`;
  const [, , w, h] = report.box;
  return `framed like ${report.recipe}: ${w}x${h} object${report.inverted ? ", light background inverted" : ""}` +
    `${report.ink_from === "alpha" ? ", ink from transparency" : ""}`;
}

async function classify(bytes, input, name = "drawing.png") {
  if (!model) return;
  lastBytes = bytes;
  const started = performance.now();
  try {
    const { input: tensor, seen, framing } = await preprocess(bytes, model.spec, $("framing").value);
    const probabilities = await run(tensor);
    if (input !== latestInput) return;
    $("error").hidden = true;
    showAnswer($("prediction"), $("bars"), probabilities, input);
    showSeen(seen);
    const milliseconds = performance.now() - started;
    $("timing").textContent = `${describeFraming(framing)}; preprocessing and inference: ${milliseconds.toFixed(1)} ms`;
    $("timing").dataset.ms = milliseconds.toFixed(1);
    document.body.dataset.firstPredictionMs ??= performance.now().toFixed(0);
    if (lastInputUrl) URL.revokeObjectURL(lastInputUrl);
    lastInputUrl = URL.createObjectURL(new Blob([bytes]));
    Object.assign($("download"), { href: lastInputUrl, download: name, hidden: false });
    if ($("ask-server").checked) await askServer(bytes, probabilities, input);
  } catch (error) {
    if (input !== latestInput) return;
    clearAnswer($("prediction"), $("bars"));
    $("prediction").textContent = "no answer";
    showError(error instanceof InvalidInput ? error.message : `unexpected error: ${error.message}`);
  }
}

// The drawing goes through the same path as a file: PNG bytes, decoded and preprocessed, so the
// server (and the tests) can be given exactly what the browser classified.
async function classifyDrawing(input) {
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  await classify(new Uint8Array(await blob.arrayBuffer()), input);
}

function clearCanvas() {
  pen.save();
  pen.fillStyle = "#000"; // light strokes on black, as in the training data
  pen.fillRect(0, 0, canvas.width, canvas.height);
  pen.restore();
}

function setUpDrawing() {
  clearCanvas();
  Object.assign(pen, { strokeStyle: "#fff", fillStyle: "#fff", lineWidth: BRUSH_WIDTH, lineCap: "round", lineJoin: "round" });
  let drawing = false;
  const point = (event) => {
    const box = canvas.getBoundingClientRect();
    return [(event.clientX - box.left) * canvas.width / box.width, (event.clientY - box.top) * canvas.height / box.height];
  };
  // Pointer events cover mouse, pen and touch alike (touch-action: none in style.css).
  canvas.addEventListener("pointerdown", (event) => {
    drawing = true;
    canvas.setPointerCapture(event.pointerId);
    const [x, y] = point(event);
    pen.beginPath(); // a tap leaves a dot (Chromium strokes nothing for a zero-length line)
    pen.arc(x, y, BRUSH_WIDTH / 2, 0, 2 * Math.PI);
    pen.fill();
    pen.beginPath();
    pen.moveTo(x, y);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    pen.lineTo(...point(event));
    pen.stroke();
  });
  const finish = () => {
    if (!drawing) return;
    drawing = false;
    classifyDrawing(nextInput());
  };
  canvas.addEventListener("pointerup", finish);
  canvas.addEventListener("pointercancel", finish);
  $("clear").addEventListener("click", () => {
    nextInput();
    clearCanvas();
    $("file-input").value = ""; // choosing the same file again must classify it again
    clearAnswer($("prediction"), $("bars"));
    $("prediction").textContent = "Draw something";
    clearAnswer($("server-prediction"), $("server-bars"));
    $("server-answer").hidden = true;
    $("error").hidden = true;
  });
}

function setUpFraming() {
  $("framing").addEventListener("change", () => lastBytes && classify(lastBytes, nextInput(), $("download").download));
}

function setUpFiles() {
  const classifyFile = async (file) => {
    if (!file) return;
    const input = nextInput();
    classify(new Uint8Array(await file.arrayBuffer()), input, file.name);
  };
  $("file-input").addEventListener("change", (event) => classifyFile(event.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    classifyFile(event.dataTransfer.files[0]);
  });
}

setUpDrawing();
setUpFiles();
setUpFraming();
try {
  model = await loadModel();
  document.body.dataset.modelReadyMs = performance.now().toFixed(0);
  const { dataset, checkpoint } = model.bundle;
  const accuracy = checkpoint.test_accuracy == null ? "" : ` (test accuracy ${(100 * checkpoint.test_accuracy).toFixed(2)}%)`;
  $("status").textContent = `${dataset} model ready${accuracy}, ` +
    `running in this browser with onnxruntime-web ${ort.env.versions?.web ?? ""}`;
  $("status").dataset.ready = "true";
} catch (error) {
  $("status").textContent = "The model did not load.";
  showError(error.message);
}

// A graftkit ONNX export in the browser with ONNX Runtime Web (the global `ort`).
// The model takes raw RGB 0-255 as float32 (N, size, size, 3) and normalises inside; graftkit
// squashes the whole image to size x size (no crop), upright by its EXIF orientation, so the
// page does the same with a canvas. Outputs by name: probabilities, and ood_score where the run
// has an open-set score (unknown when above export.json rejection.threshold).

const status = document.getElementById("status");
const input = document.getElementById("files");
const list = document.getElementById("results");

async function fetched(name) {
  const response = await fetch(name);
  if (!response.ok) {
    const said = await response.json().catch(() => ({}));
    throw new Error(said.detail || `${name}: HTTP ${response.status}`);
  }
  return response;
}

async function load() {
  if (typeof ort === "undefined") throw new Error("ONNX Runtime Web (ort/ort.wasm.min.js) did not load");
  ort.env.wasm.wasmPaths = new URL("ort/", document.baseURI).href;
  ort.env.wasm.numThreads = 1; // threads need a cross-origin isolated page
  const info = await (await fetched("export.json")).json();
  const labels = (await (await fetched("labels.txt")).text()).split("\n").filter((l) => l);
  const session = await ort.InferenceSession.create("model.onnx", { executionProviders: ["wasm"] });
  return { session, labels, info, size: info.input.size[0] };
}

function pixels(bitmap, size) {
  const canvas = new OffscreenCanvas(size, size);
  const context = canvas.getContext("2d");
  context.imageSmoothingQuality = "high";
  context.drawImage(bitmap, 0, 0, size, size);
  const rgba = context.getImageData(0, 0, size, size).data;
  const rgb = new Float32Array(size * size * 3);
  for (let i = 0, j = 0; i < rgba.length; i += 4) {
    rgb[j++] = rgba[i]; rgb[j++] = rgba[i + 1]; rgb[j++] = rgba[i + 2];
  }
  return new ort.Tensor("float32", rgb, [1, size, size, 3]);
}

async function classify(model, file) {
  const bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
  const out = await model.session.run({ [model.session.inputNames[0]]: pixels(bitmap, model.size) });
  const probabilities = Array.from(out.probabilities.data);
  const ood = out.ood_score ? out.ood_score.data[0] : null;
  const rejection = model.info.rejection;
  const thresholds = model.info.labels && model.info.labels.thresholds;
  let best = 0;
  probabilities.forEach((p, i) => { if (p > probabilities[best]) best = i; });
  return {
    name: file.name,
    label: model.labels[best],
    probability: probabilities[best],
    probabilities,
    ood_score: ood,
    known: ood === null || !rejection ? true : ood <= rejection.threshold,
    labels: thresholds ? model.labels.filter((l, i) => probabilities[i] >= thresholds[l]) : null,
  };
}

function show(answer) {
  const item = document.createElement("li");
  item.className = "answer";
  const said = answer.labels ? answer.labels.join(", ") || "(no label)"
    : `${answer.label} ${(100 * answer.probability).toFixed(1)}%`;
  item.textContent = `${answer.name}: ${said}` + (answer.known ? "" : " (unknown: none of these classes?)");
  list.append(item);
}

load().then((model) => {
  window.graftResults = [];
  status.textContent = `ready: ${model.labels.length} classes, ${model.size} px`;
  status.dataset.ready = "true";
  input.disabled = false;
  input.addEventListener("change", async () => {
    for (const file of input.files) {
      const answer = await classify(model, file);
      window.graftResults.push(answer);
      show(answer);
    }
    status.dataset.done = String(window.graftResults.length);
  });
}).catch((error) => {
  status.textContent = `could not load the model: ${error.message || error}`;
  status.dataset.error = "true";
});

// The try page: every dropped/picked image (or webcam frame) is sent to POST /predict on its
// own, so one unreadable file only fails its own card; the server batches them together.
"use strict";
const results = document.getElementById("results");
// "Review data" opens /review: it works in a tab that opened the printed review URL once (the
// token stays in that tab's sessionStorage); elsewhere the review page says which URL to open.

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

fetch("/info").then(r => r.json()).then(info => {
  const multi = info.task === "multi_label";
  const acc = typeof info.val_accuracy === "number" ? `, validation accuracy ${(100 * info.val_accuracy).toFixed(1)}%` : "";
  const map = typeof info.val_map === "number" ? `, validation mAP ${(100 * info.val_map).toFixed(1)}%` : "";
  document.getElementById("run").textContent =
    `${info.backbone}, ${info.classes.length} ${multi ? "labels, several per image" : "classes"} (${info.classes.join(", ")})${acc}${map}`;
  // the exported model in the browser, offline: or what it needs
  const link = document.getElementById("browser-link");
  if (!info.browser.available) {
    link.classList.add("muted");
    link.title = info.browser.why_not;
  }
});

// Multi-label runs: one chip per label given (above its threshold).
function chips(card, labels, probabilities) {
  const row = el("div", "chips");
  if (!labels.length) row.append(el("span", "muted", "no label above its threshold"));
  for (const label of labels) {
    row.append(el("span", "chip", `${label} ${(100 * probabilities[label]).toFixed(0)}%`));
  }
  card.append(row);
}

function bars(card, topK) {
  for (const [label, p] of topK) {
    const row = el("div", "bar");
    row.append(el("span", "", label));
    const track = el("div", "track"), fill = el("div", "fill");
    fill.style.width = (100 * p).toFixed(1) + "%";
    track.append(fill);
    row.append(track, el("span", "", (100 * p).toFixed(1) + "%"));
    card.append(row);
  }
}

async function classify(blob, name) {
  const card = el("div", "card");
  card.dataset.name = name;
  const img = el("img");
  img.src = URL.createObjectURL(blob);
  img.alt = name;
  card.append(img, el("div", "name", name));
  results.prepend(card);
  const status = el("div", "label muted", "classifying...");
  card.append(status);
  const form = new FormData();
  form.append("file", blob, name);
  try {
    const response = await fetch("/predict?top_k=3", {method: "POST", body: form});
    const body = await response.json();
    if (!response.ok) {
      status.className = "label error";
      status.textContent = body.detail || `error ${response.status}`;
      return;
    }
    const p = body.predictions[0];
    status.className = p.known ? "label" : "label unknown";
    card.dataset.known = String(p.known);
    if (p.labels) {
      status.textContent = p.known ? "labels" : "unknown (closest labels below)";
      card.dataset.labels = p.labels.join(" ");
      chips(card, p.labels, p.probabilities);
    } else {
      status.textContent = p.known ? p.label : `unknown (closest: ${p.label})`;
      card.dataset.label = p.label;
      bars(card, p.top_k);
    }
    if (p.ood_score !== null) card.append(el("div", "name", `open-set score ${p.ood_score.toFixed(3)}`));
    card.append(whyButton(card, img, blob, name));
  } catch (err) {
    status.className = "label error";
    status.textContent = "the server did not answer: " + err;
  }
}

// "Why?": the same image sent again with explain=1; the card then shows the image as the model
// sees it (squared) with the heatmap over it (a toggle, and one button per label for multi-label
// runs), and the three training images it resembles most.
function whyButton(card, img, blob, name) {
  const button = el("button", "why", "Why?");
  button.title = "where the model looked, and the training images it resembles";
  button.addEventListener("click", async () => {
    button.disabled = true;
    button.textContent = "looking...";
    const form = new FormData();
    form.append("file", blob, name);
    let body, response;
    try {
      response = await fetch("/predict?top_k=3&explain=1", {method: "POST", body: form});
      body = await response.json();
    } catch (err) {
      button.textContent = "the server did not answer: " + err;
      return;
    }
    if (!response.ok) {
      button.textContent = body.detail || `error ${response.status}`;
      return;
    }
    button.remove();
    showWhy(card, img, body.predictions[0], name);
  });
  return button;
}

function showWhy(card, img, p, name) {
  const view = el("div", "view");
  const photo = el("img");
  photo.src = img.src;
  photo.alt = `${name} as the model sees it`;
  const heat = el("img", "heat");
  view.append(photo, heat);
  img.replaceWith(view);
  const labels = Object.keys(p.heatmaps);
  const show = (label) => {
    heat.src = `data:image/png;base64,${p.heatmaps[label]}`;
    heat.alt = heat.title = `where the model looked for ${label}`;
    heat.dataset.label = label;
  };
  show(labels[0]);
  const controls = el("div", "why-controls");
  const toggle = el("button", "toggle-heat", "Hide heatmap");
  toggle.addEventListener("click", () => {
    heat.hidden = !heat.hidden;
    toggle.textContent = heat.hidden ? "Show heatmap" : "Hide heatmap";
  });
  controls.append(toggle);
  if (labels.length > 1) {
    for (const label of labels) {
      const b = el("button", "heat-label", label);
      b.addEventListener("click", () => { show(label); heat.hidden = false; toggle.textContent = "Hide heatmap"; });
      controls.append(b);
    }
  }
  controls.append(el("div", "name", `where it looked for ${labels.join(", ")}`));
  card.append(controls);
  if (p.closest === null) {
    card.append(el("div", "name", "closest training images: none kept in this run (fit it again to get them)"));
    return;
  }
  const row = el("div", "closest");
  row.append(el("div", "name", "closest training images"));
  for (const c of p.closest) {
    const figure = el("figure", "near");
    const thumb = el("img");
    thumb.src = `data:image/jpeg;base64,${c.thumbnail}`;
    thumb.alt = thumb.title = c.name;
    figure.append(thumb, el("figcaption", "", `${c.label} ${c.similarity.toFixed(2)}`));
    row.append(figure);
  }
  card.append(row);
}

function send(files) {
  for (const f of files) classify(f, f.name);
}

const drop = document.getElementById("drop");
document.getElementById("files").addEventListener("change", e => send(e.target.files));
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => {
  e.preventDefault();
  drop.classList.remove("over");
  send(e.dataTransfer.files);
});

// The webcam, where the browser allows it (a secure context: localhost or https).
const camera = document.getElementById("camera"), video = document.getElementById("video");
let stream = null, frames = 0;
if (navigator.mediaDevices && navigator.mediaDevices.getUserMedia) {
  const button = document.getElementById("webcam");
  button.hidden = false;
  button.addEventListener("click", async () => {
    try {
      stream = await navigator.mediaDevices.getUserMedia({video: true});
      video.srcObject = stream;
      camera.style.display = "flex";
    } catch (err) {
      button.textContent = "webcam not available: " + err.name;
      button.disabled = true;
    }
  });
}
document.getElementById("snap").addEventListener("click", () => {
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  canvas.toBlob(blob => classify(blob, `webcam-${++frames}.jpg`), "image/jpeg", 0.92);
});
document.getElementById("stop").addEventListener("click", () => {
  if (stream) stream.getTracks().forEach(t => t.stop());
  camera.style.display = "none";
});

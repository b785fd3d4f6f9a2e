// The review page: suspect images in groups, with relabel / set aside / undo. Every call sends
// the server's token (from this page's URL); the server moves only files it listed.
"use strict";
const token = new URLSearchParams(location.search).get("token") || "";
const stateBox = document.getElementById("state"), messageBox = document.getElementById("message");
document.getElementById("try-link").href = "/?token=" + encodeURIComponent(token);

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

async function call(path, body) {
  const options = {headers: {"X-Graft-Token": token}};
  if (body) {
    options.method = "POST";
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const data = await response.json();
  if (!response.ok) throw new Error(data.detail || `error ${response.status}`);
  return data;
}

async function act(path, body) {
  try {
    const done = await call(path, body);
    const verb = {relabel: "relabelled", set_aside: "set aside", undo: "undone"}[done.action];
    messageBox.textContent = `${verb}: ${done.from} \u2192 ${done.to} (journal: ${done.id})`;
    messageBox.className = "notice done";
  } catch (err) {
    messageBox.textContent = err.message;
    messageBox.className = "notice error";
  }
  messageBox.hidden = false;
  await load();
}

function card(item, summary) {
  const c = el("div", "card");
  c.dataset.key = item.key;
  c.dataset.path = item.path;
  if (item.image) {
    const img = el("img");
    img.loading = "lazy";
    img.alt = item.path;
    img.src = `/review/api/image?key=${encodeURIComponent(item.key)}&token=${encodeURIComponent(token)}&v=${encodeURIComponent(item.path)}`;
    c.append(img);
  }
  c.append(el("div", "name", `${item.path} (${item.split})`));
  const label = item.now === item.label ? item.label : `${item.label} \u2192 ${item.now}`;
  let line = `label: ${label}`;
  if (item.predicted) line += ` \u00b7 predicted: ${item.predicted} ${(100 * item.probability).toFixed(0)}%`;
  c.append(el("div", "", line));
  if (item.status) c.append(el("div", "status", item.status));
  const why = el("ul", "why");
  for (const reason of item.why) why.append(el("li", "", reason));
  c.append(why);
  if (!summary.can_move) return c;
  const actions = el("div", "actions");
  const select = el("select");
  for (const name of summary.classes) {
    if (name === item.now) continue;
    const option = el("option", "", name);
    option.value = name;
    select.append(option);
  }
  const relabel = el("button", "relabel", "Relabel");
  relabel.addEventListener("click", () => act("/review/api/relabel", {key: item.key, to: select.value}));
  const aside = el("button", "set-aside", "Set aside");
  aside.disabled = item.status === "set aside";
  aside.addEventListener("click", () => act("/review/api/set-aside", {key: item.key}));
  actions.append(select, relabel, aside);
  if (item.undo) {
    const undo = el("button", "undo", "Undo");
    undo.addEventListener("click", () => act("/review/api/undo", {id: item.undo}));
    actions.append(undo);
  }
  c.append(actions);
  return c;
}

function render(summary) {
  document.getElementById("where").textContent = summary.data ? `data: ${summary.data}` : "";
  if (summary.state === "checking") {
    stateBox.textContent = "Checking the data (every image is decoded once)...";
  } else if (summary.state === "ready") {
    stateBox.textContent = summary.can_move
      ? `Relabel moves a file to another class folder of its split; set aside moves it to ${summary.root}/.graft-set-aside/. Nothing is deleted; every action is written to ${summary.journal} first and can be undone.`
      : `Findings only: ${summary.read_only}`;
  } else {
    stateBox.textContent = summary.message;
    stateBox.className = "notice error";
  }
  if (summary.next) {
    document.getElementById("next").hidden = false;
    document.getElementById("next-command").textContent = summary.next;
  }
  const log = document.getElementById("log");
  log.replaceChildren();
  document.getElementById("recent").hidden = !summary.actions.length || !summary.can_move;
  for (const a of summary.actions) {
    const row = el("tr");
    row.append(el("td", "muted", a.time), el("td", "", a.action.replace("_", " ")),
               el("td", "", `${a.from} \u2192 ${a.to}`));
    const cell = el("td"), undo = el("button", "undo", "Undo");
    undo.addEventListener("click", () => act("/review/api/undo", {id: a.id}));
    cell.append(undo);
    row.append(cell);
    log.append(row);
  }
  const groups = document.getElementById("groups");
  groups.replaceChildren();
  for (const group of summary.groups) {
    const section = el("section");
    section.id = group.id;
    section.append(el("h2", "", `${group.title} (${group.items.length})`));
    if (!group.items.length) section.append(el("p", "muted", "none found"));
    const grid = el("div", "grid");
    for (const item of group.items) grid.append(card(item, summary));
    section.append(grid);
    groups.append(section);
  }
}

async function load() {
  try {
    const summary = await call("/review/api/items");
    render(summary);
    if (summary.state === "checking") setTimeout(load, 1000);
  } catch (err) {
    stateBox.textContent = err.message;
    stateBox.className = "notice error";
  }
}

load();

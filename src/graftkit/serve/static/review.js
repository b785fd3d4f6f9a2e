// The review page: suspect images in groups, with relabel / set aside / undo / restore, and the
// likely wrong labels' suggestions (accept one, or all above a probability). The token, API calls
// and thumbnails are common.js's.
"use strict";
const stateBox = document.getElementById("state"), messageBox = document.getElementById("message");
const {el} = graft;

function describe(done) {
  if (done.accepted !== undefined) {
    return `accepted ${done.accepted} suggestion(s)` +
      (done.actions.length ? `; "Restore all since" on the first of them undoes them all` : "") +
      (done.problems.length ? `; not moved: ${done.problems.join("; ")}` : "");
  }
  if (done.restored !== undefined) {
    return `restored ${done.restored} image(s)` +
      (done.problems.length ? `; not restored: ${done.problems.join("; ")}` : "");
  }
  const verb = {relabel: "relabelled", set_aside: "set aside", undo: "undone", accept: "filed"}[done.action];
  return `${verb}: ${done.from} \u2192 ${done.to} (journal: ${done.id})`;
}

function act(path, body) {
  return graft.act(messageBox, path, body, describe, load);
}

function card(item, summary) {
  const c = el("div", "card");
  c.dataset.key = item.key;
  c.dataset.path = item.path;
  if (item.image) {
    const img = el("img");
    img.alt = item.path;
    graft.thumbnail(img, `/review/api/image?key=${encodeURIComponent(item.key)}`,
                    `${item.key}|${item.path}`, item.path);
    c.append(img);
  }
  c.append(el("div", "name", `${item.path} (${item.split})`));
  const label = item.now === item.label ? item.label : `${item.label} \u2192 ${item.now}`;
  let line = `label: ${label}`;
  if (item.predicted) line += ` \u00b7 predicted: ${item.predicted} ${(100 * item.probability).toFixed(0)}%`;
  c.append(el("div", "", line));
  if (item.suggested) {
    c.append(el("div", "suggestion",
                `suggested: ${item.suggested} ${(100 * item.p_suggested).toFixed(0)}%`));
  }
  if (item.status) c.append(el("div", "status", item.status));
  const why = el("ul", "why");
  for (const reason of item.why) why.append(el("li", "", reason));
  c.append(why);
  if (!summary.can_move) return c;
  const actions = el("div", "actions");
  // The menu starts on the suggestion of the label issues, else on the model's prediction when
  // it differs from the label, else on "move to..." with Relabel disabled: a careless click
  // must not mislabel an image. On the suggestion, the button says it accepts it.
  const select = el("select");
  const none = el("option", "", "move to\u2026");
  none.value = "";
  select.append(none);
  for (const name of summary.classes) {
    if (name === item.now) continue;
    const note = name === item.suggested ? " (suggested)" : name === item.predicted ? " (predicted)" : "";
    const option = el("option", "", name + note);
    option.value = name;
    select.append(option);
  }
  const first = [item.suggested, item.predicted].find((name) => name && name !== item.now);
  select.value = first || "";
  const relabel = el("button", "relabel", "Relabel");
  const caption = () => {
    relabel.disabled = !select.value;
    relabel.textContent = select.value && select.value === item.suggested
      ? `Accept: ${item.suggested}` : "Relabel";
  };
  caption();
  select.addEventListener("change", caption);
  relabel.addEventListener("click", () => act("/review/api/relabel", {key: item.key, to: select.value}));
  const aside = el("button", "set-aside", "Set aside");
  aside.disabled = item.status === "set aside";
  aside.addEventListener("click", () => act("/review/api/set-aside", {key: item.key}));
  actions.append(select, relabel, aside);
  if (item.undo) {
    const undo = el("button", "undo", "Undo");
    undo.title = "undo the last move of this image";
    undo.addEventListener("click", () => act("/review/api/undo", {id: item.undo}));
    actions.append(undo);
  }
  if (item.moves > 1) {
    const restore = el("button", "restore", "Restore");
    restore.title = `undo all ${item.moves} moves: back to ${item.key}`;
    restore.addEventListener("click", () => act("/review/api/restore", {key: item.key}));
    actions.append(restore);
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
  if (summary.journal_problem) {
    stateBox.textContent += " " + summary.journal_problem;
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
    undo.title = "undo this move (and later moves of the same image)";
    undo.addEventListener("click", () => act("/review/api/undo", {id: a.id}));
    const since = el("button", "since", "Restore all since");
    since.title = `undo every move since ${a.time}, on every image`;
    since.addEventListener("click", () => {
      if (confirm(`Undo every move since ${a.time}?`)) act("/review/api/restore-all", {since: a.time});
    });
    cell.append(undo, since);
    row.append(cell);
    log.append(row);
  }
  const groups = document.getElementById("groups");
  groups.replaceChildren();
  for (const group of summary.groups) {
    const section = el("section");
    section.id = group.id;
    section.append(el("h2", "", `${group.title} (${group.items.length})`));
    if (group.id === "label_issues" && summary.can_move) acceptAll(section, group.items);
    if (!group.items.length) section.append(el("p", "muted", "none found"));
    const grid = el("div", "grid");
    for (const item of group.items) grid.append(card(item, summary));
    section.append(grid);
    groups.append(section);
  }
}

function acceptAll(section, items) {
  const box = el("div", "accept-all");
  graft.acceptAllBox(box,
    (threshold) => items.filter((i) => i.suggested && i.p_suggested >= threshold &&
                                       i.moves === 0 && i.now !== i.suggested).length,
    (threshold) => act("/review/api/accept", {min_p: threshold}));
  section.append(box);
}

document.getElementById("restore-all").addEventListener("click", () => {
  if (confirm("Put every image back where it was before the review moved it?")) {
    act("/review/api/restore-all", {since: null});
  }
});

async function load() {
  if (!graft.token) {
    stateBox.textContent = "This page needs the review URL that graft serve printed when it " +
      "started (it ends in /review?token=...): open that URL once in this tab.";
    stateBox.className = "notice error";
    return;
  }
  try {
    const summary = await graft.call("/review/api/items");
    render(summary);
    if (summary.state === "checking") setTimeout(load, 1000);
  } catch (err) {
    stateBox.textContent = err.message;
    stateBox.className = "notice error";
  }
}

window.graftReload = load;  // refit.js: the new run's findings
load();

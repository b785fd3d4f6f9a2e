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
  if (done.action === "edit") {
    const verb = done.undoes ? "undone" : "edited";
    return `${verb}: ${done.key}: ${labelText(done.before)} \u2192 ${labelText(done.after)} ` +
      `in ${done.table} (journal: ${done.id})`;
  }
  const verb = {relabel: "relabelled", set_aside: "set aside", undo: "undone", accept: "filed"}[done.action];
  return `${verb}: ${done.from} \u2192 ${done.to} (journal: ${done.id})`;
}

function labelText(labels) {
  return labels && labels.length ? labels.join(" ") : "(no label)";
}

// What an action did, for the log: a move's paths, or an edit's labels.
function change(a) {
  return a.action === "edit" ? `${a.key}: ${labelText(a.before)} \u2192 ${labelText(a.after)}`
    : `${a.from} \u2192 ${a.to}`;
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
  if (item.predicted) {
    line += ` \u00b7 predicted: ${item.predicted}` +
      (item.probability !== null ? ` ${(100 * item.probability).toFixed(0)}%` : "");
  }
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
  if (summary.mode === "table" && !item.editable) {
    c.append(el("div", "muted", "its row is not in a table inside the data folder: edit it by hand"));
    return c;
  }
  const actions = summary.multi_label ? labelActions(item, summary) : classActions(item, summary);
  if (item.undo) {
    const undo = el("button", "undo", "Undo");
    undo.title = "undo the last change of this image";
    undo.addEventListener("click", () => act("/review/api/undo", {id: item.undo}));
    actions.append(undo);
  }
  if (item.moves > 1) {
    const restore = el("button", "restore", "Restore");
    restore.title = `undo all ${item.moves} changes: back to how it was listed`;
    restore.addEventListener("click", () => act("/review/api/restore", {key: item.key}));
    actions.append(restore);
  }
  c.append(actions);
  return c;
}

// Multi-label table data: the row's labels as chips (x takes one away), the model's extra
// labels one click away, any other label from the menu.
function labelActions(item, summary) {
  const actions = el("div", "actions");
  const chips = el("div", "chips labels");
  for (const name of item.labels) {
    const chip = el("span", "chip", name + " ");
    chip.dataset.label = name;
    const remove = el("button", "remove", "\u00d7");
    remove.title = `take the label ${name} away` + (item.missed.includes(name) ? " (the model misses it)" : "");
    remove.addEventListener("click", () => act("/review/api/labels", {key: item.key, label: name, present: false}));
    chip.append(remove);
    chips.append(chip);
  }
  if (!item.labels.length) chips.append(el("span", "muted", "no label"));
  actions.append(chips);
  for (const name of item.added.filter((n) => !item.labels.includes(n))) {
    const add = el("button", "suggest-add", `+ ${name}`);
    add.dataset.label = name;
    add.title = `add ${name}: the model gives it`;
    add.addEventListener("click", () => act("/review/api/labels", {key: item.key, label: name, present: true}));
    actions.append(add);
  }
  const select = el("select");
  const none = el("option", "", "add a label\u2026");
  none.value = "";
  select.append(none);
  for (const name of summary.classes.filter((n) => !item.labels.includes(n))) {
    const option = el("option", "", name);
    option.value = name;
    select.append(option);
  }
  const add = el("button", "add", "Add");
  add.disabled = true;
  select.addEventListener("change", () => { add.disabled = !select.value; });
  add.addEventListener("click", () => act("/review/api/labels", {key: item.key, label: select.value, present: true}));
  actions.append(select, add);
  return actions;
}

// One class per image: the menu and Relabel (a move of the file, or an edit of its table row)
// and set aside (class folders only).
function classActions(item, summary) {
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
  actions.append(select, relabel);
  if (summary.mode === "folders") {
    const aside = el("button", "set-aside", "Set aside");
    aside.disabled = item.status === "set aside";
    aside.addEventListener("click", () => act("/review/api/set-aside", {key: item.key}));
    actions.append(aside);
  }
  return actions;
}

function render(summary) {
  document.getElementById("where").textContent = summary.data ? `data: ${summary.data}` : "";
  if (summary.state === "checking") {
    stateBox.textContent = "Checking the data (every image is decoded once)...";
  } else if (summary.state === "ready") {
    const tables = Object.values(summary.tables).filter((t, i, all) => all.indexOf(t) === i).join(", ");
    const how = summary.mode === "table"
      ? (summary.multi_label ? `Adding or taking away a label edits the image's row of ${tables}`
                             : `Relabel edits the image's row of ${tables}`) +
        "; the rest of the table stays as it is and the file is replaced in one step."
      : `Relabel moves a file to another class folder of its split; set aside moves it to ${summary.root}/.graft-set-aside/. Nothing is deleted.`;
    stateBox.textContent = summary.can_move
      ? `${how} Every action is written to ${summary.journal} first and can be undone.`
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
               el("td", "", change(a)));
    const cell = el("td"), undo = el("button", "undo", "Undo");
    undo.title = "undo this change (and later changes of the same image)";
    undo.addEventListener("click", () => act("/review/api/undo", {id: a.id}));
    const since = el("button", "since", "Restore all since");
    since.title = `undo every change since ${a.time}, on every image`;
    since.addEventListener("click", () => {
      if (confirm(`Undo every change since ${a.time}?`)) act("/review/api/restore-all", {since: a.time});
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
    if (group.id === "label_issues" && summary.can_move && !summary.multi_label) {
      acceptAll(section, group.items);
    }
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
  if (confirm("Put every image back as it was before the review changed it?")) {
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

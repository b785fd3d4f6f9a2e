// The inbox page: new images with the model's suggestion, in the order to label them. The
// token, API calls and thumbnails are common.js's; undo goes through the review API (one
// journal for the data folder).
"use strict";
const stateBox = document.getElementById("state"), messageBox = document.getElementById("message");
const {el} = graft;
const PAGE = 48;
const shown = {known: PAGE, unknown: PAGE};

function describe(done) {
  if (done.accepted !== undefined) {
    return `filed ${done.accepted} image(s) under their suggestion` +
      (done.problems.length ? `; not moved: ${done.problems.join("; ")}` : "");
  }
  const verb = {accept: "filed", relabel: "refiled", set_aside: "set aside", undo: "undone"}[done.action];
  return `${verb}: ${done.from} \u2192 ${done.to} (journal: ${done.id})`;
}

function act(path, body) {
  return graft.act(messageBox, path, body, describe, load);
}

function pct(p) { return `${(100 * p).toFixed(0)}%`; }

function card(item, summary) {
  const c = el("div", "card");
  c.dataset.key = item.key;
  c.dataset.path = item.path;
  const img = el("img");
  img.alt = item.path;
  graft.thumbnail(img, `/review/api/inbox/image?key=${encodeURIComponent(item.key)}`,
                  `${item.key}|${item.now}`, item.path);
  c.append(img, el("div", "name", `#${item.order} \u00b7 ${item.path}`));
  c.append(el("div", "suggestion", `suggested: ${item.suggested} ${pct(item.probability)}`));
  if (item.second) c.append(el("div", "muted", `then: ${item.second} ${pct(item.p_second)}`));
  if (item.status) c.append(el("div", "status", item.status));
  if (!summary.can_move) return c;
  const actions = el("div", "actions");
  // Known images start on the suggestion; unknown ones on "file under..." with the button off:
  // an image unlike every class is the user's call.
  const select = el("select");
  const none = el("option", "", "file under\u2026");
  none.value = "";
  select.append(none);
  for (const name of summary.classes) {
    if (name === item.now) continue;
    const option = el("option", "", name === item.suggested ? `${name} (suggested)` : name);
    option.value = name;
    select.append(option);
  }
  select.value = item.known && item.suggested !== item.now ? item.suggested : "";
  const accept = el("button", "accept", "");
  const caption = () => {
    accept.disabled = !select.value;
    accept.textContent = select.value === item.suggested ? `Accept: ${item.suggested}` : "File";
  };
  caption();
  select.addEventListener("change", caption);
  accept.addEventListener("click", () => act("/review/api/inbox/accept", {key: item.key, to: select.value}));
  const aside = el("button", "set-aside", "Set aside");
  aside.disabled = item.now === "set aside";
  aside.addEventListener("click", () => act("/review/api/inbox/set-aside", {key: item.key}));
  actions.append(select, accept, aside);
  if (item.undo) {
    const undo = el("button", "undo", "Undo");
    undo.title = "put the image back (undo its last move)";
    undo.addEventListener("click", () => act("/review/api/undo", {id: item.undo}));
    actions.append(undo);
  }
  c.append(actions);
  return c;
}

function acceptBox(summary) {
  const box = document.getElementById("accept-box");
  box.replaceChildren();
  if (!summary.can_move) return;
  graft.acceptAllBox(box,
    (threshold) => summary.items.filter((i) => i.now === "inbox" && i.moves === 0 &&
                                               i.probability >= threshold).length,
    (threshold) => act("/review/api/inbox/accept-all", {min_p: threshold}));
}

function fill(kind, items, summary) {
  const grid = document.getElementById(`${kind}-grid`);
  grid.replaceChildren();
  for (const item of items.slice(0, shown[kind])) grid.append(card(item, summary));
  const more = document.getElementById(`${kind}-more`);
  more.hidden = items.length <= shown[kind];
  more.textContent = `Show more (${items.length - shown[kind]} left)`;
  more.onclick = () => { shown[kind] += PAGE; fill(kind, items, summary); };
}

function render(summary) {
  document.getElementById("where").textContent =
    `inbox: ${summary.folder}` + (summary.data ? ` \u2192 data: ${summary.data}` : "");
  if (summary.state === "scoring") {
    stateBox.textContent = "Scoring the new images (each goes through the model once)...";
  } else if (summary.state === "ready") {
    stateBox.textContent = summary.can_move
      ? `${summary.items.length + summary.unknown.length} new images; accepted ones go to ${summary.target.replace(/CLASS$/, "<class>")}/ (${summary.accepted} so far).`
      : `Suggestions only: ${summary.read_only || summary.message}`;
    stateBox.className = "notice";
  } else {
    stateBox.textContent = summary.message;
    stateBox.className = "notice error";
  }
  if (summary.skipped.length) stateBox.textContent += ` Skipped: ${summary.skipped.join("; ")}`;
  if (summary.next) {
    document.getElementById("next").hidden = false;
    document.getElementById("next-command").textContent = summary.next;
  }
  document.getElementById("known-title").textContent = `New images (${summary.items.length})`;
  document.getElementById("unknown-title").textContent = `None of these classes? (${summary.unknown.length})`;
  document.getElementById("unknown").hidden = !summary.unknown.length;
  acceptBox(summary);
  fill("known", summary.items, summary);
  fill("unknown", summary.unknown, summary);
}

async function load() {
  if (!graft.token) {
    stateBox.textContent = "This page needs the inbox URL that graft serve printed when it " +
      "started (it ends in /inbox?token=...): open that URL once in this tab.";
    stateBox.className = "notice error";
    return;
  }
  try {
    const summary = await graft.call("/review/api/inbox/items");
    render(summary);
    if (summary.state === "scoring") setTimeout(load, 1000);
  } catch (err) {
    stateBox.textContent = err.message;
    stateBox.className = "notice error";
  }
}

window.graftReload = load;  // refit.js: the new run's findings
load();

// What the review and inbox pages share: the token, small DOM and API helpers, thumbnails and
// the "accept all above a probability" box. The token comes from the URL graft serve printed
// (or this tab's earlier visit): it is kept for this tab only (sessionStorage), removed from the
// address bar and history, and sent as a header, never in a URL. Thumbnails are fetched with the
// header too and shown as blob: URLs.
"use strict";
const graft = (() => {
  const params = new URLSearchParams(location.search);
  const token = params.get("token") || sessionStorage.getItem("graft-token") || "";
  if (params.has("token")) {
    sessionStorage.setItem("graft-token", token);
    history.replaceState(null, "", location.pathname);
  }
  const thumbnails = new Map();  // id -> blob: URL, kept across re-renders

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

  async function thumbnail(img, url, id, label) {
    if (!thumbnails.has(id)) {
      const response = await fetch(url, {headers: {"X-Graft-Token": token}});
      if (!response.ok) { img.alt = `${label}: cannot be shown`; return; }
      thumbnails.set(id, URL.createObjectURL(await response.blob()));
    }
    img.src = thumbnails.get(id);
  }

  // "Accept the N suggestions with p >= X": the count, kept up to date as X changes, is shown
  // before anything moves; ``count(threshold)`` applies the server's own rule to what the page
  // shows, ``accept(threshold)`` asks the server to do it.
  let acceptAt = "0.90";
  function acceptAllBox(box, count, accept) {
    const input = el("input");
    Object.assign(input, {type: "number", min: "0", max: "1", step: "0.05", value: acceptAt,
                          id: "accept-threshold"});
    input.setAttribute("aria-label", "lowest probability of the suggestion to accept");
    const button = el("button", "primary", "");
    button.id = "accept-all";
    const update = () => {
      acceptAt = input.value;
      const threshold = Number(input.value);
      const valid = input.value !== "" && threshold >= 0 && threshold <= 1;
      const n = valid ? count(threshold) : 0;
      button.dataset.count = String(n);
      button.textContent = `Accept the ${n} suggestion${n === 1 ? "" : "s"} with p \u2265 ${valid ? threshold.toFixed(2) : "?"}`;
      button.disabled = n === 0;
    };
    input.addEventListener("input", update);
    button.addEventListener("click", () => accept(Number(input.value)));
    update();
    box.append(el("span", "muted", "suggestion probability at least "), input, button);
  }

  // The page drawn again by ``reload``, then the notice after the action: a notice on screen
  // describes the page under it (a click on a card the notice announced is a click on a card
  // drawn after the action, never on one about to be replaced).
  async function act(messageBox, path, body, describe, reload) {
    messageBox.hidden = true;
    messageBox.textContent = "";
    let text, kind;
    try {
      text = describe(await call(path, body));
      kind = "notice done";
    } catch (err) {
      text = err.message;
      kind = "notice error";
    }
    await reload();
    messageBox.textContent = text;
    messageBox.className = kind;
    messageBox.hidden = false;
  }

  return {token, el, call, thumbnail, acceptAllBox, act};
})();

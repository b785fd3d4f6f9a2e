// "Refit now" on the review and inbox pages: starts graft refit on the server, shows its log
// while it runs, and says which run is served when it is done. Needs common.js and an element
// #refit.
"use strict";
(function () {
  const box = document.getElementById("refit");
  if (!box) return;
  const token = graft.token;
  const button = document.getElementById("refit-now");
  const state = document.getElementById("refit-state");
  const log = document.getElementById("refit-log");

  async function call(method) {
    const response = await fetch("/review/api/refit", {method, headers: {"X-Graft-Token": token}});
    const data = await response.json();
    if (!response.ok) throw new Error(data.detail || `error ${response.status}`);
    return data;
  }

  function show(status) {
    button.disabled = status.state === "running";
    log.hidden = !status.log.length;
    log.textContent = status.log.join("\n");
    log.scrollTop = log.scrollHeight;
    const words = {idle: "", running: `refitting into ${status.out}...`, done: status.message,
                   failed: status.message};
    state.textContent = words[status.state];
    state.className = status.state === "failed" ? "error" : "muted";
    box.dataset.state = status.state;
    if (status.state === "running") setTimeout(poll, 2000);
    if (status.state === "done" && typeof window.graftReload === "function") window.graftReload();
  }

  async function poll() {
    try { show(await call("GET")); } catch (err) { state.textContent = err.message; }
  }

  button.addEventListener("click", async () => {
    try { show(await call("POST")); } catch (err) {
      state.textContent = err.message;
      state.className = "error";
    }
  });
  if (token) poll();
})();

// Live updates without reloading: a page whose <main> has data-live is
// fetched again every two seconds (only while it is visible) and its
// <main> replaced. The server renders everything; this only swaps HTML.
"use strict";
(function () {
  const main = document.querySelector("main[data-live]");
  if (!main) return;
  const status = document.getElementById("live-status");
  let busy = false;
  async function refresh() {
    if (busy || document.hidden) return;
    busy = true;
    try {
      const response = await fetch(location.href, { headers: { "x-kiln-fragment": "1" } });
      if (response.ok) {
        main.innerHTML = await response.text();
        if (status) status.textContent = "live · updated " + new Date().toLocaleTimeString();
        if (!response.headers.get("x-kiln-live")) {
          clearInterval(timer);
          if (status) status.textContent = "final";
        }
      } else if (status) {
        status.textContent = "update failed: HTTP " + response.status;
      }
    } catch (e) {
      if (status) status.textContent = "server unreachable; retrying";
    } finally {
      busy = false;
    }
  }
  const timer = setInterval(refresh, 2000);
})();

// The heat-map toggle: swap each slice image between its thumbnail and its Grad-CAM overlay. The overlay URLs sit
// in data-heatmap and are only requested on the first toggle (the server computes each once and caches it).
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const toggle = document.getElementById("heatmap-toggle");
  if (!toggle) return;
  toggle.addEventListener("change", () => {
    for (const img of document.querySelectorAll("img[data-heatmap]")) {
      if (!img.dataset.thumbnail) img.dataset.thumbnail = img.getAttribute("src");
      img.setAttribute("src", toggle.checked ? img.dataset.heatmap : img.dataset.thumbnail);
      img.classList.toggle("heat", toggle.checked);
    }
  });
});

// A model card as a person reads it: what the model takes (shape, channels, units, sizes),
// what it was trained on, the recommended methods, and how good it is (the card's validation).

import { el } from "./dom.js";

const show = (v) => (v === null || v === undefined ? "none stated" : typeof v === "string" ? v : JSON.stringify(v));

function row(list, term, value) {
  list.append(el("dt", {}, term), el("dd", {}, show(value)));
}

function methodsText(methods) {
  return (methods || []).map((m, i) => {
    const params = Object.entries(m).filter(([k]) => k !== "name").map(([k, v]) => `${k} ${JSON.stringify(v)}`);
    return `${i + 1}. ${m.name}${params.length ? ` (${params.join(", ")})` : ""}`;
  }).join("; ");
}

/** One row per task and method: the figures the card's benchmark measured. */
function validationTable(v) {
  const table = el("table", {}, el("caption", {}, `${v.benchmark || "validation"}: ${v.metric || ""}`
    + ` (${v.cases || "?"} cases${v.noise_sigma ? `, noise_sigma ${v.noise_sigma}` : ""})`));
  table.append(el("tr", {}, el("th", { scope: "col" }, "task"), el("th", { scope: "col" }, "method"),
    el("th", { scope: "col" }, "figures")));
  for (const [task, t] of Object.entries(v.tasks || {})) {
    const methods = t.methods || t;
    for (const [method, figures] of Object.entries(methods)) {
      if (!figures || typeof figures !== "object") continue;
      const text = Object.entries(figures).map(([k, x]) => `${k} ${x}`).join(", ");
      table.append(el("tr", {}, el("td", {}, task + (t.headline ? ` (headline ${t.headline})` : "")),
        el("td", {}, method), el("td", {}, text)));
    }
  }
  return table;
}

export function renderCard(box, card) {
  const list = el("dl", { class: "card" });
  row(list, "description", card.description);
  row(list, "kind", card.kind);
  row(list, "shape [C, H, W]", card.shape);
  row(list, "channels", (card.channels || []).join(", "));
  row(list, "value range", card.value_range);
  row(list, "sizes", card.sizes ? `${card.sizes.any ? "any size" : "native only"}, native ${show(card.sizes.native)}`
    + `${card.sizes.min ? `, min ${show(card.sizes.min)}` : ""}` : `${card.shape[1]} x ${card.shape[2]} only`);
  if (card.pde) row(list, "PDE", card.pde.equation || card.pde.kind);
  row(list, "recommended methods (best first)", methodsText(card.methods));
  if (card.data) row(list, "trained on", card.data.content || card.data.source);
  const parts = [list];
  if (card.validation) {
    const details = el("details", {}, el("summary", {}, "How good it is (the card's validation figures)"),
      validationTable(card.validation));
    parts.push(details);
  } else {
    parts.push(el("p", { class: "help" }, "This card states no validation figures."));
  }
  box.replaceChildren(...parts);
}

// A small helper to build elements: el("label", {for: "x"}, "text", child, ...).

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) node.append(c instanceof Node ? c : String(c));
  return node;
}

export const $ = (id) => document.getElementById(id);

/** Shows `message` in the page's error box exactly as given (the API's own wording). */
export function showError(message, where = "error") {
  const box = $(where);
  box.textContent = message;
  box.hidden = !message;
}

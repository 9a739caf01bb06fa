// Arrays drawn on canvases: a "stack" is {D, C, H, W, data} (slices, channels, rows, columns);
// a panel shows one slice of a stack, each channel in grayscale (three channels as colour), the
// std in a colour map, with the values its ends stand for.

import { el } from "./dom.js";

const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

/** A parsed array as a stack: [H,W], [C,H,W] (or [D,H,W] when the leading axis is not the
 * model's channel count) and [D,C,H,W]; null when it is not an image (e.g. [N] points). */
export function toStack(arr, modelChannels) {
  const s = arr.shape;
  if (s.length === 2) return { D: 1, C: 1, H: s[0], W: s[1], data: arr.data };
  if (s.length === 3) {
    const channels = s[0] === modelChannels || (s[0] <= 3 && modelChannels !== 1);
    return channels ? { D: 1, C: s[0], H: s[1], W: s[2], data: arr.data }
      : { D: s[0], C: 1, H: s[1], W: s[2], data: arr.data };
  }
  if (s.length === 4) return { D: s[0], C: s[1], H: s[2], W: s[3], data: arr.data };
  return null;
}

/** Sample k of a samples array ([K,C,H,W] or [K,D,C,H,W]) as a stack. */
export function sampleStack(arr, k) {
  const [K, ...rest] = arr.shape;
  const size = rest.reduce((a, b) => a * b, 1);
  const one = { shape: rest, data: arr.data.subarray(k * size, (k + 1) * size) };
  return { ...toStack(one, rest.length === 3 ? rest[0] : rest[1]), K };
}

function plane(stack, d, c) {
  const n = stack.H * stack.W;
  const start = (d * stack.C + c) * n;
  return stack.data.subarray(start, start + n);
}

function extent(values) {
  let lo = Infinity, hi = -Infinity;
  for (const v of values) { if (v < lo) lo = v; if (v > hi) hi = v; }
  return lo === hi ? [lo, lo + 1e-12] : [lo, hi];
}

function colour(t, map) {
  if (!map) return [t * 255, t * 255, t * 255];
  const x = t * (map.length - 1), i = Math.min(Math.floor(x), map.length - 2), f = x - i;
  return map[i].map((a, j) => a + f * (map[i + 1][j] - a));
}

/** A canvas of one or three planes scaled to [lo, hi]. */
function canvasOf(planes, H, W, [lo, hi], map) {
  const canvas = el("canvas", { width: W, height: H });
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(W, H);
  const scale = 1 / (hi - lo || 1);
  for (let i = 0; i < H * W; i++) {
    const t = planes.map((p) => Math.min(1, Math.max(0, (p[i] - lo) * scale)));
    const rgb = planes.length === 3 ? t.map((v) => v * 255) : colour(t[0], map);
    img.data.set([rgb[0], rgb[1], rgb[2], 255], 4 * i);
  }
  ctx.putImageData(img, 0, 0);
  return canvas;
}

/** The range a channel is drawn with: the card's value range where it states one. */
function rangeOf(values, valueRange, name) {
  if (Array.isArray(valueRange)) return valueRange;
  if (valueRange && Array.isArray(valueRange[name])) return valueRange[name];
  return extent(values);
}

const fmt = (v) => Number(v).toPrecision(3);

/** Draws slice d of `stack` into `figure` under `title` (opts: channels, valueRange, map). */
export function drawPanel(figure, title, stack, d, opts = {}) {
  figure.replaceChildren(el("figcaption", {}, title));
  const names = opts.channels || [];
  const groups = stack.C === 3 ? [[0, 1, 2]] : [...Array(stack.C).keys()].map((c) => [c]);
  for (const group of groups) {
    const planes = group.map((c) => plane(stack, d, c));
    const name = group.length === 1 ? names[group[0]] || `channel ${group[0]}` : names.join(", ") || "RGB";
    const range = opts.map ? extent(planes[0]) : rangeOf(planes.flatMap((p) => Array.from(p)), opts.valueRange, name);
    const canvas = canvasOf(planes, stack.H, stack.W, range, opts.map ? VIRIDIS : null);
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", `${title}, ${name}, slice ${d}`);
    canvas.dataset.slice = String(d);
    figure.append(el("div", { class: "channel" }, canvas,
      el("small", {}, `${name}: ${fmt(range[0])} (dark) to ${fmt(range[1])} (bright)`)));
  }
}

export const STD_MAP = VIRIDIS;

/** A note in place of a panel for an array that is not an image. */
export function notAnImage(figure, title, shape) {
  figure.replaceChildren(el("figcaption", {}, title),
    el("p", { class: "help" }, `shape [${shape.join(", ")}]: not an image, not drawn`));
}

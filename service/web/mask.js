// Drawing a mask [H, W] (1 = observed / sampled, 0 = not): paint with the pointer, or from the
// keyboard: all, none, a random fraction, or a centred box left out. Saved as a float32 .npy.

import { $ } from "./dom.js";
import { float32Npy } from "./npy.js";

const SCALE = 4; // screen pixels per mask pixel

/** Opens the mask dialog for an H x W mask; done(blob, summary) when the person saves it. */
export function drawMask(name, H, W, done) {
  const dialog = $("mask-dialog");
  const canvas = $("mask-canvas");
  canvas.width = W;
  canvas.height = H;
  canvas.style.width = `${W * SCALE}px`;
  const mask = new Float32Array(H * W).fill(1);
  const redraw = () => paint(canvas, mask, H, W);
  $("mask-title").textContent = `Draw ${name} (${H} x ${W}): white = 1 (observed), black = 0`;
  wireTools(mask, H, W, redraw);
  wirePointer(canvas, mask, H, W, redraw);
  redraw();
  $("mask-save").onclick = () => {
    const kept = mask.reduce((a, b) => a + b, 0);
    const blob = new Blob([float32Npy(mask, [H, W])], { type: "application/octet-stream" });
    blob.name = `${name}.npy`;
    done(blob, `drawn: ${H} x ${W}, ${(100 * kept / mask.length).toFixed(1)} % ones`);
    dialog.close();
  };
  $("mask-cancel").onclick = () => dialog.close();
  dialog.showModal();
}

function paint(canvas, mask, H, W) {
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(W, H);
  mask.forEach((v, i) => img.data.set([v * 255, v * 255, v * 255, 255], 4 * i));
  ctx.putImageData(img, 0, 0);
}

function wireTools(mask, H, W, redraw) {
  $("mask-all").onclick = () => { mask.fill(1); redraw(); };
  $("mask-none").onclick = () => { mask.fill(0); redraw(); };
  $("mask-random").onclick = () => {
    const keep = Number($("mask-fraction").value) / 100;
    for (let i = 0; i < mask.length; i++) mask[i] = Math.random() < keep ? 1 : 0;
    redraw();
  };
  $("mask-box").onclick = () => {
    mask.fill(1);
    const side = Math.round(Math.sqrt(1 - Number($("mask-fraction").value) / 100) * Math.min(H, W));
    const top = Math.floor((H - side) / 2), left = Math.floor((W - side) / 2);
    for (let r = top; r < top + side; r++) for (let c = left; c < left + side; c++) mask[r * W + c] = 0;
    redraw();
  };
}

function wirePointer(canvas, mask, H, W, redraw) {
  let down = false;
  const at = (ev) => {
    const box = canvas.getBoundingClientRect();
    const col = Math.floor((ev.clientX - box.left) / box.width * W);
    const row = Math.floor((ev.clientY - box.top) / box.height * H);
    const brush = Number($("mask-brush").value), value = $("mask-erase").checked ? 0 : 1;
    for (let r = row - brush + 1; r < row + brush; r++) {
      for (let c = col - brush + 1; c < col + brush; c++) {
        if (r >= 0 && r < H && c >= 0 && c < W) mask[r * W + c] = value;
      }
    }
    redraw();
  };
  canvas.onpointerdown = (ev) => { down = true; canvas.setPointerCapture(ev.pointerId); at(ev); };
  canvas.onpointermove = (ev) => { if (down) at(ev); };
  canvas.onpointerup = () => { down = false; };
}

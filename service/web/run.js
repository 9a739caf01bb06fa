// Running a job: submit (multipart), progress from the event stream, cancel; then the result:
// observation, mean, std and a sample side by side (slice and sample sliders), the misfit flag,
// the metrics, and every download the API offers.

import { call, followEvents, getJson, submitJob } from "./api.js";
import { $, el, showError } from "./dom.js";
import { decodeApiArray } from "./npy.js";
import { STD_MAP, drawPanel, notAnImage, sampleStack, toStack } from "./view.js";

const TERMINAL = ["succeeded", "failed", "cancelled"];
const FORMATS = { npy: ".npy", tiff: ".tif", nifti: ".nii.gz", dicom: ".zip" };
const job = { id: null, stream: null, result: null, card: null, obs: null };
let ctx = null;

export function wireRun(context) {
  ctx = context;
  $("submit").addEventListener("click", () => ctx.guarded(startRun));
  $("cancel").addEventListener("click", () => ctx.guarded(cancel));
  $("slice").addEventListener("input", redraw);
  $("sample").addEventListener("input", redraw);
  $("slice").addEventListener("change", () => ctx.guarded(serverPicture));
}

function setStatus(st) {
  const shown = $("job-status").dataset;
  if (shown.job === st.id && TERMINAL.includes(shown.status)) return; // a late answer never undoes the end
  const p = st.progress || { step: 0, total: 0 };
  $("progress").max = Math.max(p.total, 1);
  $("progress").value = p.step;
  $("job-status").textContent = `job ${st.id}: ${st.status}, step ${p.step} of ${p.total}`;
  $("job-status").dataset.status = st.status;
  $("job-status").dataset.job = st.id;
}

export async function startRun() {
  const { request, files } = ctx.build();
  if (job.stream) job.stream.abort();
  $("results").hidden = true;
  const page = ctx.page();
  const st = await submitJob(request, files);
  Object.assign(job, { id: st.id, result: null, card: page.card, obs: page.obs });
  setStatus(st);
  $("cancel").disabled = false;
  job.stream = new AbortController();
  follow(st.id, job.stream.signal);
}

const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Progress from the event stream; where the stream ends before the job (a proxy, a restart of
 * the server), polling GET /v1/jobs/{id} takes over. */
async function follow(id, signal) {
  let final = false;
  try {
    await followEvents(id, (name, data) => {
      if (id !== job.id) return;
      setStatus(data);
      if (name === "status" && TERMINAL.includes(data.status)) {
        final = true;
        finished(data);
      }
    }, signal);
  } catch (e) {
    if (e.name === "AbortError") return;
  }
  if (!final) await ctx.guarded(() => poll(id, signal));
}

async function poll(id, signal) {
  while (!signal.aborted && id === job.id) {
    let st = null;
    try {
      st = await getJson(`/v1/jobs/${id}`);
    } catch (e) {
      if (e.status) throw e; // an API error; a network error (the server restarting): try again
    }
    if (st) setStatus(st);
    if (st && TERMINAL.includes(st.status)) return finished(st);
    await pause(1000);
  }
}

async function cancel() {
  if (!job.id) return;
  setStatus(await (await call(`/v1/jobs/${job.id}`, { method: "DELETE" })).json());
}

function finished(st) {
  $("cancel").disabled = true;
  if (st.status === "succeeded") ctx.guarded(showResult);
  else if (st.status === "failed" && st.error) showError(`${st.status} ${st.error.code}: ${st.error.message}`);
}

async function showResult() {
  const r = await getJson(`/v1/jobs/${job.id}/result`);
  job.result = { body: r, mean: decodeApiArray(r.mean), std: decodeApiArray(r.std), samples: decodeApiArray(r.samples) };
  const base = job.result.mean || job.result.samples;
  const volume = base && base.shape.length === (job.result.mean ? 4 : 5);
  const D = volume ? base.shape[job.result.mean ? 0 : 1] : 1;
  const K = job.result.samples ? job.result.samples.shape[0] : 0;
  setRange("slice", D, volume);
  setRange("sample", K, K > 0);
  $("results").hidden = false;
  showMetrics(r);
  showDownloads(r);
  redraw();
  serverPicture();
}

function setRange(id, n, shown) {
  $(id).max = Math.max(n - 1, 0);
  $(id).value = 0;
  $(`${id}-field`).hidden = !shown;
  $(`${id}-value`).textContent = shown ? `0 of ${n - 1}` : "";
}

/** Every panel at the sliders' slice and sample. */
function redraw() {
  if (!job.result) return;
  const d = Number($("slice").value), k = Number($("sample").value);
  $("slice-value").textContent = `${d} of ${$("slice").max}`;
  $("sample-value").textContent = `${k} of ${$("sample").max}`;
  const card = job.card, opts = { channels: card.channels, valueRange: card.value_range };
  const C = card.shape[0];
  const panel = (id, title, stack, extra = {}) => {
    const fig = $(`panel-${id}`);
    if (!stack) return fig.replaceChildren(el("figcaption", {}, `${title}: not returned`));
    drawPanel(fig, title, stack, Math.min(d, stack.D - 1), { ...opts, ...extra });
  };
  const obs = job.obs && job.obs.parsed;
  const obsStack = obs ? toStack(obs, C) : null;
  if (!obs) {
    $("panel-observation").replaceChildren(el("figcaption", {}, "observation"),
      el("p", { class: "help" }, "a lab file: drawn by the server in result.png below"));
  } else if (!obsStack) notAnImage($("panel-observation"), "observation", obs.shape);
  else panel("observation", "observation", obsStack);
  panel("mean", "posterior mean", job.result.mean && toStack(job.result.mean, C));
  panel("std", "posterior std", job.result.std && toStack(job.result.std, C), { map: STD_MAP });
  panel("sample", `sample ${k}`, job.result.samples && sampleStack(job.result.samples, k));
}

/** GET result.png (?slice=k for a volume): the server's own picture of the result. */
async function serverPicture() {
  if (!job.result) return;
  const volume = !$("slice-field").hidden;
  const q = volume ? `?slice=${$("slice").value}` : "";
  const blob = await (await call(`/v1/jobs/${job.id}/result.png${q}`)).blob();
  const img = el("img", { src: URL.createObjectURL(blob), alt: `the server's picture of the result${volume ? `, slice ${$("slice").value}` : ""}` });
  $("panel-server").replaceChildren(el("figcaption", {}, `result.png${q}: observation, mean, std as the server draws them`), img);
}

function showMetrics(r) {
  const m = r.metrics || {};
  const list = $("metrics");
  list.replaceChildren();
  const add = (k, v) => list.append(el("dt", {}, k), el("dd", {}, typeof v === "object" ? JSON.stringify(v) : String(v)));
  for (const [k, v] of Object.entries(m)) if (v !== null && v !== undefined) add(k, v);
  add("nfe (network evaluations)", r.nfe);
  add("elapsed_s", r.elapsed_s);
  add("method as run", r.method);
  const box = $("misfit");
  box.hidden = !m.misfit;
  box.textContent = m.misfit ? `Misfit: the samples do not explain the observation (whitened misfit `
    + `${JSON.stringify(m.whitened_misfit)} above the threshold ${m.misfit_threshold}). The prior cannot explain it, `
    + "noise_sigma is understated, or the method has not converged: try the card's default method or more steps." : "";
}

function showDownloads(r) {
  const buttons = [button("result JSON", `/v1/jobs/${job.id}/result`, `${job.id}-result.json`),
    button("result.png", `/v1/jobs/${job.id}/result.png`, `${job.id}-result.png`)];
  for (const field of ["mean", "std", "samples"]) {
    if (!r[field]) continue;
    for (const [fmt, ext] of Object.entries(FORMATS)) {
      buttons.push(button(`${field} ${ext}`, `/v1/jobs/${job.id}/result?format=${fmt}&field=${field}`,
        `${job.id}-${field}${ext}`));
    }
  }
  $("downloads").replaceChildren(...buttons);
}

/** A button that fetches `path` (with the key) and saves it as `name`; errors as the API words them. */
function button(label, path, name) {
  const b = el("button", { type: "button", "data-path": path }, label);
  b.addEventListener("click", () => ctx.guarded(async () => {
    const blob = await (await call(path)).blob();
    const a = el("a", { href: URL.createObjectURL(blob), download: name });
    document.body.append(a);
    a.click();
    a.remove();
  }));
  return b;
}

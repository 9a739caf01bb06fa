// The page: a model and its card, an observation (a file, or a demonstration from an example),
// the operator and method forms from the server's own schemas, and the request built from them.
// Running the job and showing its result: run.js.

import { getJson, postJson, setApiKey } from "./api.js";
import { renderCard } from "./card.js";
import { $, el, showError } from "./dom.js";
import { collect, methodForm, operatorForm } from "./forms.js";
import { drawMask } from "./mask.js";
import { decodeApiArray, parseNpy, float32Npy } from "./npy.js";
import { wireRun } from "./run.js";
import { toStack } from "./view.js";

const FILE_TYPES = ".npy,.png,.tif,.tiff,.nii,.gz,.zip";
const page = { models: [], operators: [], methods: [], card: null, obs: null, opForm: null, methodForm: null };

/** Runs `fn`, showing an error (the API's own message) instead of throwing. */
export async function guarded(fn) {
  try {
    showError("");
    return await fn();
  } catch (e) {
    showError(e.status ? `${e.status} ${e.code}: ${e.message}` : String(e.message || e));
    return undefined;
  }
}

async function loadCatalogue() {
  const [{ models }, { operators }] = await Promise.all([getJson("/v1/models"), getJson("/v1/operators")]);
  page.models = models;
  page.operators = operators;
  $("model").replaceChildren(...models.map((m) => el("option", { value: m.id }, `${m.id} (${m.kind})`)));
  $("operator-kind").replaceChildren(...operators.map((o) => el("option", { value: o.kind }, o.kind)));
  await chooseModel();
}

async function chooseModel() {
  const card = page.models.find((m) => m.id === $("model").value);
  page.card = card;
  renderCard($("card"), card);
  $("pde-fields").hidden = !card.pde;
  const { methods } = await getJson(`/v1/methods?model=${encodeURIComponent(card.id)}`);
  page.methods = methods;
  const first = card.methods && card.methods[0] ? card.methods[0].name : "";
  $("method-name").replaceChildren(el("option", { value: "" }, `the card's default (${first})`),
    ...methods.map((m) => el("option", { value: m.name }, m.tuned ? `${m.name} (recommended)` : m.name)));
  chooseOperator();
  chooseMethod();
  if (page.obs) showObservation(page.obs);
  document.body.dataset.model = card.id; // the forms are this model's
}

/** The image size a mask is drawn at: the observation's where it is an image, else the card's. */
function imageSize() {
  const stack = page.obs && page.obs.stack;
  return stack ? [stack.H, stack.W] : page.card.shape.slice(1);
}

function chooseOperator() {
  const op = page.operators.find((o) => o.kind === $("operator-kind").value);
  const tools = { accept: FILE_TYPES, draw: (name, done) => drawMask(name, ...imageSize(), done) };
  page.opForm = operatorForm(op, tools);
  const text = op.schema.description || "";
  $("operator-help").textContent = text.includes(op.observation_shape) ? text : `${text} Observation ${op.observation_shape}.`;
  $("operator-params").replaceChildren(...page.opForm.nodes);
}

function chooseMethod() {
  const name = $("method-name").value;
  const m = page.methods.find((x) => x.name === name);
  page.methodForm = m ? methodForm(m) : null;
  $("method-help").textContent = m ? `${m.summary} (${m.paper}); blank fields: the value shown` :
    "the card's first recommended method with its tuned parameters";
  $("method-params").replaceChildren(...(page.methodForm ? page.methodForm.nodes : []));
}

// ------------------------------------------------------------------------------ observation
/** A PNG as the page shows it: [H, W] (gray) or [3, H, W], in [0, 1] (8 bits, display only). */
async function decodePng(file) {
  const bitmap = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const { width: W, height: H } = bitmap;
  const canvas = el("canvas", { width: W, height: H });
  const g = canvas.getContext("2d");
  g.drawImage(bitmap, 0, 0);
  const rgba = g.getImageData(0, 0, W, H).data;
  const n = W * H;
  let gray = true;
  for (let i = 0; i < n && gray; i++) gray = rgba[4 * i] === rgba[4 * i + 1] && rgba[4 * i] === rgba[4 * i + 2];
  const C = gray ? 1 : 3, data = new Float64Array(C * n);
  for (let c = 0; c < C; c++) for (let i = 0; i < n; i++) data[c * n + i] = rgba[4 * i + c] / 255;
  return { shape: gray ? [H, W] : [3, H, W], dtype: "png", data };
}

async function readObservationFile(file) {
  const obs = { blob: file, summary: `${file.name}, ${file.size} bytes` };
  const head = new Uint8Array(await file.slice(0, 8).arrayBuffer());
  if (head[0] === 0x89 && head[1] === 0x50) {
    try {
      obs.parsed = await decodePng(file);
      obs.summary += `: PNG [${obs.parsed.shape.join(", ")}]`;
    } catch (e) { /* not drawn here; the server says what is wrong with it */ }
  }
  if (head[0] === 0x93) {
    try {
      obs.parsed = parseNpy(await file.arrayBuffer());
      obs.summary += `: ${obs.parsed.dtype} [${obs.parsed.shape.join(", ")}]`;
    } catch (e) { /* not drawn here; the server says what is wrong with it */ }
  }
  return obs;
}

function showObservation(obs) {
  $("obs-summary").textContent = obs.summary;
  obs.stack = obs.parsed ? toStack(obs.parsed, page.card.shape[0]) : null;
}

async function makeDemo(files) {
  const operator = await inlineArrays(collect(page.opForm.fields, files), files);
  const body = { model: page.card.id, operator: { kind: $("operator-kind").value, ...operator },
    example: Number($("demo-example").value), noise_sigma: Number($("noise-sigma").value || 0),
    seed: Number($("seed").value || 0) };
  const demo = await postJson("/web/demo", body);
  const parsed = decodeApiArray(demo.observation);
  const blob = new Blob([float32Npy(parsed.data, parsed.shape)]);
  blob.name = "demo-observation.npy";
  page.obs = { blob, parsed, truth: decodeApiArray(demo.truth),
    summary: `example ${demo.example} observed through ${body.operator.kind}: [${parsed.shape.join(", ")}]` };
  showObservation(page.obs);
}

/** Operator arrays sent inline ({"npy"|"png"|"tiff": base64}) for the demonstration endpoint. */
async function inlineArrays(operator, files) {
  for (const [k, v] of Object.entries(operator)) {
    if (v && v.file) {
      const bytes = new Uint8Array(await files[v.file].arrayBuffer());
      const kind = bytes[0] === 0x89 ? "png" : (bytes[0] === 0x49 || bytes[0] === 0x4d) ? "tiff" : "npy";
      let s = "";
      for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
      operator[k] = { [kind]: btoa(s) };
    } else if (v && typeof v === "object" && !Array.isArray(v)) {
      operator[k] = await inlineArrays(v, files);
    }
  }
  return operator;
}

// ------------------------------------------------------------------------------ the request
function numberOrNull(id) {
  const v = $(id).value;
  return v === "" ? null : Number(v);
}

/** The job's JSON and its file parts, from every form on the page. */
export function buildRequest() {
  if (!page.obs) throw new Error("choose an observation file, or make a demonstration observation, first");
  const files = { observation: page.obs.blob };
  const operator = { kind: $("operator-kind").value, ...collect(page.opForm.fields, files) };
  const request = { model: page.card.id, operator, observation: { file: "observation" },
    noise_sigma: numberOrNull("noise-sigma") ?? 0, num_samples: numberOrNull("num-samples") ?? 1,
    seed: numberOrNull("seed") ?? 0, return: [...document.querySelectorAll("input[name=return]:checked")].map((c) => c.value) };
  if (page.methodForm) request.method = { name: $("method-name").value, ...collect(page.methodForm.fields, files) };
  if ($("value-window").value.trim()) request.value_window = JSON.parse($("value-window").value);
  if (numberOrNull("coupling") !== null) request.coupling = { kind: "tv_z", weight: numberOrNull("coupling") };
  if (page.card.pde && $("pde").checked) request.pde = { kind: page.card.pde.kind };
  if (page.card.pde && $("completion").value) request.completion = $("completion").value;
  return { request, files };
}

export const currentPage = () => page;

function wire() {
  $("api-key").addEventListener("change", () => { setApiKey($("api-key").value); guarded(loadCatalogue); });
  $("model").addEventListener("change", () => guarded(chooseModel));
  $("operator-kind").addEventListener("change", chooseOperator);
  $("method-name").addEventListener("change", chooseMethod);
  for (const radio of document.querySelectorAll("input[name=obs-source]")) {
    radio.addEventListener("change", () => {
      $("obs-upload").hidden = radio.value !== "upload" || !radio.checked;
      $("obs-demo").hidden = radio.value !== "demo" || !radio.checked;
    });
  }
  $("obs-file").addEventListener("change", () => guarded(async () => {
    page.obs = null;
    const file = $("obs-file").files[0];
    if (file) showObservation(page.obs = await readObservationFile(file));
  }));
  $("demo-make").addEventListener("click", () => guarded(() => makeDemo({})));
  wireRun({ build: buildRequest, page: currentPage, guarded });
}

wire();
guarded(loadCatalogue);

// Forms generated from the server's own declarations: an operator kind's JSON schema
// (GET /v1/operators) and a method's parameter_info (GET /v1/methods). A new kind or parameter
// needs no change here. Every field answers read(files) -> its value, or undefined (not sent).

import { el } from "./dom.js";

let serial = 0;
const nextId = (name) => `f-${name.replace(/[^\w-]/g, "_")}-${++serial}`;

/** An input with its label and description; `control` is the input element. */
function labelled(name, control, help) {
  const wrap = el("div", { class: "field" });
  control.id = nextId(name);
  control.name = name;
  wrap.append(el("label", { for: control.id }, name));
  wrap.append(control);
  if (help) {
    const h = el("small", { id: `${control.id}-help`, class: "help" }, help);
    control.setAttribute("aria-describedby", h.id);
    wrap.append(h);
  }
  return wrap;
}

function resolve(schema, root) {
  if (schema && schema.$ref) return root.$defs[schema.$ref.split("/").pop()];
  return schema;
}

/** An array parameter: its anyOf offers the encoded forms ({"npy": ...}, {"file": ...}). */
function isArrayParam(s) {
  return Array.isArray(s.anyOf) && s.anyOf.some((a) => a.properties && a.properties.npy);
}

/** A number, or a JSON value (a list, say); "" -> undefined. */
function parseLoose(text) {
  const t = text.trim();
  if (t === "") return undefined;
  try { return JSON.parse(t); } catch (e) { return t; }
}

function numberInput(s, placeholder) {
  const input = el("input", { type: "number", step: s.type === "integer" ? "1" : "any" });
  if (s.minimum !== undefined) input.min = s.minimum;
  if (s.maximum !== undefined) input.max = s.maximum;
  if (placeholder !== undefined && placeholder !== null) input.placeholder = String(placeholder);
  return input;
}

function choiceInput(choices, placeholder) {
  const select = el("select");
  select.append(el("option", { value: "" }, placeholder === undefined ? "(not sent)" : `(default: ${placeholder})`));
  for (const c of choices) select.append(el("option", { value: JSON.stringify(c) }, String(c)));
  return select;
}

/** A field for one schema property (arrays get a file input, and a drawing button for images). */
function schemaField(name, schema, root, path, tools) {
  let s = resolve(schema, root);
  let help = s.description || "";
  if (isArrayParam(s)) return arrayField(name, s, path, tools);
  if (Array.isArray(s.anyOf)) {
    const rest = s.anyOf.filter((a) => a.type !== "null");
    if (rest.length === 1) s = { ...resolve(rest[0], root), description: help, default: s.default };
  }
  if (s.type === "object" && s.properties) return objectField(name, s, root, path, tools);
  const placeholder = s.default === null ? undefined : s.default;
  if (s.const !== undefined) return { node: null, read: () => s.const };
  const choices = s.enum || (s.type === "boolean" ? [true, false] : null);
  const control = choices ? choiceInput(choices, placeholder)
    : (s.type === "integer" || s.type === "number") ? numberInput(s, placeholder)
      : el("input", { type: "text", placeholder: placeholder === undefined ? "a number or a JSON list" : String(placeholder) });
  if (placeholder !== undefined && !help.includes("default")) help += ` (default ${JSON.stringify(placeholder)})`;
  const read = () => {
    if (control.value === "") return undefined;
    if (choices) return JSON.parse(control.value);
    return control.type === "number" ? Number(control.value) : parseLoose(control.value);
  };
  return { node: labelled(name, control, help), read, control };
}

function objectField(name, s, root, path, tools) {
  const box = el("fieldset", { class: "nested" });
  box.append(el("legend", {}, name));
  if (s.description) box.append(el("small", { class: "help" }, s.description));
  const fields = schemaFields(s, root, `${path}.`, tools);
  fields.forEach((f) => f.node && box.append(f.node));
  const read = (files) => {
    const out = collect(fields, files);
    return Object.keys(out).length ? out : undefined;
  };
  return { node: box, read };
}

function arrayField(name, s, path, tools) {
  const file = el("input", { type: "file", accept: tools.accept });
  const node = labelled(`${name} (file)`, file, s.description);
  const part = `${path}${name}`;
  let drawn = null;
  if (/\[H,\s*W\]/.test(s.description || "") && tools.draw) {
    const button = el("button", { type: "button" }, `Draw ${name}`);
    const status = el("span", { class: "help", role: "status" });
    button.addEventListener("click", () => tools.draw(name, (blob, summary) => {
      drawn = blob;
      file.value = "";
      status.textContent = summary;
    }));
    node.append(button, status);
  }
  const read = (files) => {
    const blob = file.files[0] || drawn;
    if (!blob) return undefined;
    files[part] = blob;
    return { file: part };
  };
  return { node, read, control: file };
}

/** The fields of an object schema's properties. */
export function schemaFields(schema, root, path, tools) {
  return Object.entries(schema.properties || {}).map(([name, prop]) => {
    const f = schemaField(name, prop, root, path, tools);
    return { name, ...f };
  });
}

/** {name: value} of the fields that have one (files collected into `files`). */
export function collect(fields, files) {
  const out = {};
  for (const f of fields) {
    const v = f.read(files);
    if (v !== undefined) out[f.name] = v;
  }
  return out;
}

/** The operator form of one kind (`op` as GET /v1/operators lists it). */
export function operatorForm(op, tools) {
  const fields = schemaFields(op.schema, op.schema, "operator.", tools);
  return { fields, nodes: fields.map((f) => f.node).filter(Boolean) };
}

/** The parameter form of one method (`m` as GET /v1/methods?model= lists it): blank fields are
 * not sent, so the server uses the card's tuned value, else the generic default. */
export function methodForm(m) {
  const fields = Object.entries(m.parameter_info).map(([name, info]) => {
    const tuned = m.tuned && m.tuned[name] !== undefined ? m.tuned[name] : undefined;
    const used = tuned !== undefined ? tuned : info.default;
    let help = info.meaning || "";
    if (info.unit) help += ` [${info.unit}]`;
    help += `; default ${JSON.stringify(info.default)}`;
    if (tuned !== undefined) help += `, this model's card runs ${JSON.stringify(tuned)}`;
    const range = [info.minimum !== undefined && `>= ${info.minimum}`, info.exclusive_minimum !== undefined
      && `> ${info.exclusive_minimum}`, info.maximum !== undefined && `<= ${info.maximum}`].filter(Boolean);
    if (range.length) help += `; range ${range.join(", ")}`;
    const s = { type: info.per_channel ? "string" : "number", minimum: info.minimum, maximum: info.maximum, default: used };
    const field = info.choices ? schemaField(name, { enum: info.choices, default: used, description: help }, {}, "", {})
      : schemaField(name, { ...s, description: help }, {}, "", {});
    return { name, ...field };
  });
  return { fields, nodes: fields.map((f) => f.node) };
}

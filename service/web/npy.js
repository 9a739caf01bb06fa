// .npy files in the browser: read (numeric and bool dtypes, C order) and write (float32).
// Format: magic "\x93NUMPY", version (major, minor), header length (2 bytes in v1, 4 in v2/v3),
// a Python dict literal {'descr': '<f4', 'fortran_order': False, 'shape': (..)}, then the data.

const TYPES = {
  f4: Float32Array, f8: Float64Array, i1: Int8Array, u1: Uint8Array, b1: Uint8Array,
  i2: Int16Array, u2: Uint16Array, i4: Int32Array, u4: Uint32Array,
  i8: BigInt64Array, u8: BigUint64Array,
};

/** Parse .npy bytes -> {shape: number[], dtype: "f4"..., data: Float64Array}. Throws on
 * what it cannot read (big-endian, Fortran order, objects). */
export function parseNpy(buffer) {
  const bytes = new Uint8Array(buffer);
  const magic = String.fromCharCode(...bytes.slice(1, 6));
  if (bytes[0] !== 0x93 || magic !== "NUMPY") throw new Error("not a .npy file");
  const view = new DataView(buffer);
  const major = bytes[6];
  const headerLen = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder("latin1").decode(bytes.slice(start, start + headerLen));
  const descr = /'descr':\s*'([^']+)'/.exec(header)[1];
  if (/'fortran_order':\s*True/.test(header)) throw new Error("Fortran-ordered .npy is not shown");
  const shape = /'shape':\s*\(([^)]*)\)/.exec(header)[1].split(",")
    .map((s) => s.trim()).filter((s) => s).map(Number);
  const order = descr[0], code = descr.slice(1);
  if (order === ">" && code !== "i1" && code !== "u1" && code !== "b1") throw new Error("big-endian .npy is not shown");
  const Type = TYPES[code];
  if (!Type) throw new Error(`dtype ${descr} is not shown`);
  const count = shape.reduce((a, b) => a * b, 1);
  const offset = start + headerLen;
  const raw = new Type(buffer.slice(offset, offset + count * Type.BYTES_PER_ELEMENT));
  return { shape, dtype: code, data: Float64Array.from(raw, Number) };
}

/** A float32 .npy file of `data` (any array-like of numbers) with `shape`. */
export function float32Npy(data, shape) {
  const dims = shape.length === 1 ? `${shape[0]},` : shape.join(", ");
  let header = `{'descr': '<f4', 'fortran_order': False, 'shape': (${dims}), }`;
  const pad = 64 - ((10 + header.length + 1) % 64);
  header = header + " ".repeat(pad % 64) + "\n";
  const out = new Uint8Array(10 + header.length + data.length * 4);
  out.set([0x93, 78, 85, 77, 80, 89, 1, 0], 0);
  new DataView(out.buffer).setUint16(8, header.length, true);
  out.set(new TextEncoder().encode(header), 10);
  new Float32Array(out.buffer, 10 + header.length, data.length).set(data);
  return out;
}

export function base64ToBuffer(b64) {
  const s = atob(b64);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out.buffer;
}

/** An encoded API array ({"npy": base64, ...}) -> parsed array, or null. */
export function decodeApiArray(value) {
  return value && value.npy ? parseNpy(base64ToBuffer(value.npy)) : null;
}

// The Web Worker side of `Twinfer.create({ worker: true })`: one engine per worker, driven by
// messages { id, op, args } from remote.js; replies { id, result } / { id, error } and, while a
// generation runs, { id, token } and { id, progress }.
import { serialize } from "./errors.js";
import { Twinfer } from "./twinfer.js";

let tf = null;
const aborts = new Map();

const post = (msg, transfer = []) => self.postMessage(msg, transfer);

self.onmessage = async ({ data: { id, op, args } }) => {
  try {
    const result = await handle(id, op, args ?? {});
    const transfer = result?.transfer ?? [];
    post({ id, result: result?.value }, transfer);
  } catch (e) {
    post({ id, error: serialize(e) });
  }
};

async function handle(id, op, args) {
  const progress = (p) => post({ id, progress: p });
  switch (op) {
    case "create":
      tf = await Twinfer.create({ ...args, worker: false, onProgress: progress });
      return { value: tf.info() };
    case "loadModel": {
      const controller = new AbortController();
      aborts.set(id, controller);
      try {
        return { value: await engine().loadModel(args.source, { ...args.options, onProgress: progress, signal: controller.signal }) };
      } finally {
        aborts.delete(id);
      }
    }
    case "embed": {
      const vectors = await engine().embed(args.texts);
      return { value: vectors, transfer: vectors.map((v) => v.buffer) };
    }
    case "generate": {
      const controller = new AbortController();
      aborts.set(id, controller);
      try {
        const it = engine().generate(args.prompt, { ...args.options, signal: controller.signal });
        for (;;) {
          const r = await it.next();
          if (r.done) return { value: r.value };
          post({ id, token: r.value });
        }
      } finally {
        aborts.delete(id);
      }
    }
    case "abort":
      aborts.get(args.target)?.abort();
      return { value: null };
    case "metrics":
      return { value: await engine().metrics(args) };
    case "dispose":
      await engine().dispose();
      tf = null;
      return { value: null };
    default:
      throw new TypeError(`unknown operation ${op}`);
  }
}

function engine() {
  if (!tf) throw new Error("the worker's engine is not open");
  return tf;
}

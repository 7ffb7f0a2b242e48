// Node's half of `#platform` (package.json "imports"): what only Node has. Bundlers resolve the
// browser half, so a web app never sees a `node:` import.
export { readFile } from "node:fs/promises";

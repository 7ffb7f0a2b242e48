// The browser's half of `#platform` (package.json "imports"): never called there (the loader
// asks for it in Node only), present so that bundlers have a file to resolve.
export async function readFile() {
  throw new Error("reading files from disk needs Node");
}

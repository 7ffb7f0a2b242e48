// The package's own files go through Vite untouched (the wasm-bindgen glue finds its .wasm with
// `new URL(..., import.meta.url)`, which Vite rewrites when it bundles).
export default { build: { target: "es2022" }, worker: { format: "es" }, optimizeDeps: { exclude: ["twinfer"] } };

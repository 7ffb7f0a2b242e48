// One kernel case timed: a warm-up, then `runs` timed runs with performance.now(). Shared by the
// page (one thread) and its worker (the threaded build).

export function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  const n = s.length;
  return n % 2 ? s[(n - 1) / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
}

export function timeCase(BenchCase, spec, runs) {
  const c = new BenchCase(spec);
  try {
    // Warm up for a second (three runs at least): V8 first runs a module's functions as baseline
    // code and swaps in optimised code when its background compile is done, which took several
    // runs of a short case, so fewer warm-up runs left some timed runs on the slow tier.
    const warmUntil = performance.now() + 1000;
    for (let i = 0; i < 3 || performance.now() < warmUntil; i++) c.run();
    const ms = [];
    for (let i = 0; i < runs; i++) {
      const t = performance.now();
      c.run();
      ms.push(performance.now() - t);
    }
    const med = median(ms);
    const rate = c.work / (med / 1e3) / 1e9;
    const unit = c.bound === "memory" ? "GB/s" : "GFLOP/s";
    return { spec, name: c.name, simd: c.simd, bound: c.bound, work: c.work, ms, medianMs: med, rate, unit };
  } finally {
    c.free();
  }
}

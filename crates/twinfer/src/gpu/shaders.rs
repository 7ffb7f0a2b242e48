//! The shader registry: every `.wgsl` file embedded once, and the source of each (kernel, variant)
//! assembled from a generated prelude, the shared `online_softmax.wgsl` and the kernel file.
//!
//! Kernel files select variant-specific lines with `// #if SUBGROUP`, `// #else` and `// #endif`
//! comment lines, so that each file stays one kernel and reads as WGSL.

use std::fmt;

/// The shared online-softmax code, prepended to every kernel.
pub const SHARED: (&str, &str) = twinfer_shaders::ONLINE_SOFTMAX;

/// One entry per kernel file, in the order of [`Kernel::ALL`] (the `twinfer-shaders` crate is
/// the top-level `shaders/` folder).
const FILES: [(&str, &str); 17] = twinfer_shaders::KERNELS;

/// Kernels with `// #if Q8` lines: the ones that read or write a K/V pool.
const Q8_KERNELS: &[Kernel] =
    &[Kernel::Decode, Kernel::Prefill, Kernel::PrefillPortable, Kernel::AppendKv, Kernel::RopeAppend];

/// Kernels with `// #if SUBGROUP` lines.
const SUBGROUP_KERNELS: &[Kernel] = &[
    Kernel::Decode,
    Kernel::Prefill,
    Kernel::LinearGemv,
    Kernel::LinearGemvQ4,
    Kernel::LinearGemvQ8,
    Kernel::LinearGemvQ8Offset,
];

/// A compute kernel; its label is its file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Ragged batch prefill over ragged contiguous KV or the paged pool (register-tiled).
    Prefill,
    /// Batch decode over the paged pool, split-K into chunks.
    Decode,
    /// Merges split-K partial states (outputs and LSEs) into final rows.
    Merge,
    /// Writes new K/V rows into their pages of the device-resident pool.
    AppendKv,
    /// Benchmark ceiling: a streaming read (memory bandwidth).
    BenchRead,
    /// Benchmark ceiling: an f32 FMA loop (compute throughput).
    BenchFma,
    /// Projection of decode rows (GEMV) over float weights.
    LinearGemv,
    /// Projection of prompt chunks (tiled matmul) over float weights.
    LinearMatmul,
    /// Prefill where the register-tiled kernel does not run (one score per thread).
    PrefillPortable,
    /// The resident forward pass's final RMSNorm of the rows that get logits (the other norms
    /// and SwiGLU are fused into projections).
    RmsNorm,
    /// The resident forward pass's RoPE on q and k with the K/V append to the pool, in one pass.
    RopeAppend,
    /// Greedy sampling of the rows that get logits (one token id read back per row).
    ArgmaxRows,
    /// The resident encoder's post-norm of the residual stream (BERT), in place.
    LayerNorm,
    /// Top-k sampling on the device: the k largest logits of each row with their ids.
    TopkRows,
    /// [`LinearGemv`](Self::LinearGemv) over block-quantized weights with 4-bit codes (Q4_0,
    /// Q4_1, Q4_K), decoded in registers.
    LinearGemvQ4,
    /// [`LinearGemv`](Self::LinearGemv) over 8-bit codes (Q8_0, Q5_0, Q6_K).
    LinearGemvQ8,
    /// [`LinearGemv`](Self::LinearGemv) over 8-bit codes with an offset (Q5_1, Q5_K).
    LinearGemvQ8Offset,
    /// [`LinearMatmul`](Self::LinearMatmul) over 4-bit codes (Q4_0, Q4_1, Q4_K).
    LinearMatmulQ4,
    /// [`LinearMatmul`](Self::LinearMatmul) over 8-bit codes (Q8_0, Q5_0, Q6_K).
    LinearMatmulQ8,
    /// [`LinearMatmul`](Self::LinearMatmul) over 8-bit codes with an offset (Q5_1, Q5_K).
    LinearMatmulQ8Offset,
    /// [`LinearMatmul`](Self::LinearMatmul) over f16 weights on cooperative matrices (tensor
    /// cores), its input split by [`LinearSplitF16`](Self::LinearSplitF16); only where
    /// `AdapterSummary::tensor_cores`.
    LinearMatmulCoop,
    /// The input rows of [`LinearMatmulCoop`](Self::LinearMatmulCoop) as two f16 parts each.
    LinearSplitF16,
    /// [`Prefill`](Self::Prefill) on cooperative matrices (tensor cores): f16 K/V, head dims
    /// that are multiples of 16 up to 128; only where `AdapterSummary::tensor_cores`, and only
    /// when `GpuOptions::tensor_core_prefill` asks for it.
    PrefillCoop,
}

/// How a projection kernel reads its weights (see [`source`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WeightRead {
    Float,
    Nibbles,
    Bytes,
    BytesOffset,
}

impl Kernel {
    /// Every kernel (the tests compile each one in every variant).
    pub const ALL: [Kernel; 23] = [
        Kernel::Prefill,
        Kernel::Decode,
        Kernel::Merge,
        Kernel::AppendKv,
        Kernel::BenchRead,
        Kernel::BenchFma,
        Kernel::LinearGemv,
        Kernel::LinearMatmul,
        Kernel::PrefillPortable,
        Kernel::RmsNorm,
        Kernel::RopeAppend,
        Kernel::ArgmaxRows,
        Kernel::LinearGemvQ4,
        Kernel::LinearGemvQ8,
        Kernel::LinearGemvQ8Offset,
        Kernel::LinearMatmulQ4,
        Kernel::LinearMatmulQ8,
        Kernel::LinearMatmulQ8Offset,
        Kernel::LayerNorm,
        Kernel::TopkRows,
        Kernel::LinearMatmulCoop,
        Kernel::LinearSplitF16,
        Kernel::PrefillCoop,
    ];

    fn index(self) -> usize {
        match self {
            Kernel::Prefill => 0,
            Kernel::Decode => 1,
            Kernel::Merge => 2,
            Kernel::AppendKv => 3,
            Kernel::BenchRead => 4,
            Kernel::BenchFma => 5,
            Kernel::LinearGemv | Kernel::LinearGemvQ4 | Kernel::LinearGemvQ8 | Kernel::LinearGemvQ8Offset => 6,
            Kernel::LinearMatmul | Kernel::LinearMatmulQ4 | Kernel::LinearMatmulQ8 | Kernel::LinearMatmulQ8Offset => 7,
            Kernel::PrefillPortable => 8,
            Kernel::RmsNorm => 9,
            Kernel::RopeAppend => 10,
            Kernel::ArgmaxRows => 11,
            Kernel::LayerNorm => 12,
            Kernel::TopkRows => 13,
            Kernel::LinearMatmulCoop => 14,
            Kernel::LinearSplitF16 => 15,
            Kernel::PrefillCoop => 16,
        }
    }
    /// The file name, used as the pipeline label.
    pub fn file(self) -> &'static str {
        FILES[self.index()].0
    }
    fn text(self) -> &'static str {
        FILES[self.index()].1
    }
    /// The GEMV of decode rows, over any weight format.
    pub fn is_gemv(self) -> bool {
        matches!(self, Kernel::LinearGemv | Kernel::LinearGemvQ4 | Kernel::LinearGemvQ8 | Kernel::LinearGemvQ8Offset)
    }
    /// The tiled matmul of prompt chunks, over any weight format.
    pub fn is_matmul(self) -> bool {
        matches!(
            self,
            Kernel::LinearMatmul | Kernel::LinearMatmulQ4 | Kernel::LinearMatmulQ8 | Kernel::LinearMatmulQ8Offset
        )
    }
    fn weight_read(self) -> Option<WeightRead> {
        match self {
            Kernel::LinearGemv | Kernel::LinearMatmul => Some(WeightRead::Float),
            Kernel::LinearGemvQ4 | Kernel::LinearMatmulQ4 => Some(WeightRead::Nibbles),
            Kernel::LinearGemvQ8 | Kernel::LinearMatmulQ8 => Some(WeightRead::Bytes),
            Kernel::LinearGemvQ8Offset | Kernel::LinearMatmulQ8Offset => Some(WeightRead::BytesOffset),
            _ => None,
        }
    }
    /// Whether the kernel has a subgroup-specific path (the others ignore the variant).
    pub fn uses_subgroups(self) -> bool {
        SUBGROUP_KERNELS.contains(&self)
    }
    /// Whether the kernel compiles for K/V (or weights) stored as `kv`: the int8 pool format is
    /// read and written by the attention and append kernels only.
    pub fn supports(self, kv: KvStorage) -> bool {
        if matches!(self, Kernel::LinearMatmulCoop | Kernel::LinearSplitF16 | Kernel::PrefillCoop) {
            return kv == KvStorage::F16;
        }
        kv.is_float() || Q8_KERNELS.contains(&self)
    }
    /// Whether the kernel needs the adapter's cooperative matrices (and subgroups, and f16).
    pub fn uses_cooperative_matrices(self) -> bool {
        matches!(self, Kernel::LinearMatmulCoop | Kernel::PrefillCoop)
    }
}

/// The checks wgpu compiles into each kernel.
///
/// `Full` is wgpu's default: clamped indices and a hidden iteration counter in every loop, which
/// stops the driver from unrolling the kernels' constant-bound inner loops. The kernels are this
/// crate's own and their loops are bounded by host-validated parameters, so `Bounds` (indices
/// still clamped, loops left as written) gives up nothing the host does not already check.
/// `Unchecked` also drops the clamps wgpu compiles in; on Vulkan, wgpu enables the driver's
/// robust buffer access, so buffer reads and writes stay inside their bindings anyway, and what
/// goes is the clamp on every workgroup-memory index, which the kernels form from thread ids and
/// validated shapes only (4-11% of the prefill's time on an H200, depending on the build).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ShaderChecks {
    /// Bounds checks and loop bounding.
    Full,
    /// Bounds checks only.
    #[default]
    Bounds,
    /// Neither (every index the kernels form is validated on the host).
    Unchecked,
}

impl ShaderChecks {
    /// The default for a wgpu backend (`AdapterSummary::backend`): `Unchecked` where the driver
    /// bounds buffer accesses itself (Vulkan), `Bounds` elsewhere.
    pub fn for_backend(backend: &str) -> Self {
        if backend == "vulkan" { ShaderChecks::Unchecked } else { ShaderChecks::Bounds }
    }

    /// Lowercase name: `full`, `bounds` or `unchecked`.
    pub fn name(self) -> &'static str {
        match self {
            ShaderChecks::Full => "full",
            ShaderChecks::Bounds => "bounds",
            ShaderChecks::Unchecked => "unchecked",
        }
    }

    pub(crate) fn runtime_checks(self) -> wgpu::ShaderRuntimeChecks {
        let mut checks = wgpu::ShaderRuntimeChecks::checked();
        checks.bounds_checks = self != ShaderChecks::Unchecked;
        checks.force_loop_bounding = self == ShaderChecks::Full;
        checks
    }
}

/// How reductions are done. (The tensor cores are an engine option, not a variant: see
/// `GpuOptions::tensor_cores`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Variant {
    /// Workgroup-memory reductions only: runs on every WebGPU implementation.
    #[default]
    Baseline,
    /// Subgroup reductions (`subgroupMax`/`subgroupAdd`) for any subgroup size.
    Subgroup,
}

impl Variant {
    /// Lowercase name: `baseline` or `subgroup`.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Baseline => "baseline",
            Variant::Subgroup => "subgroup",
        }
    }
    /// Every variant, for tests that must cover them all.
    pub const ALL: [Variant; 2] = [Variant::Baseline, Variant::Subgroup];
}

/// Storage type of K and V on the device (and of float projection weights); math is f32 either
/// way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvStorage {
    /// 32-bit floats.
    F32,
    /// Needs the adapter's `SHADER_F16`.
    F16,
    /// K/V pools only: int8 codes with an f32 scale per (token, KV head) row, as the CPU's int8
    /// cache. A buffer holds the scales of all its rows first, then the codes (see
    /// `GpuKvCache`), so that a row's number finds both.
    Q8,
}

impl KvStorage {
    /// Every storage type.
    pub const ALL: [KvStorage; 3] = [KvStorage::F32, KvStorage::F16, KvStorage::Q8];
    /// Bytes per element (of the codes, for `Q8`, whose scales come on top).
    pub fn bytes(self) -> usize {
        match self {
            KvStorage::F32 => 4,
            KvStorage::F16 => 2,
            KvStorage::Q8 => 1,
        }
    }
    /// Whether projection weights can be stored this way (the int8 pool format is K/V only).
    pub fn is_float(self) -> bool {
        self != KvStorage::Q8
    }
}

impl fmt::Display for KvStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvStorage::F32 => "f32",
            KvStorage::F16 => "f16",
            KvStorage::Q8 => "q8",
        })
    }
}

/// Who compiles the source: naga (native wgpu, and the no-GPU test) rejects `enable subgroups;`,
/// which browsers require.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// naga, which compiles for native wgpu.
    Naga,
    /// A browser's WebGPU implementation.
    Browser,
}

impl Target {
    /// `Browser` on wasm32, else `Naga`.
    pub fn current() -> Self {
        if cfg!(target_arch = "wasm32") { Target::Browser } else { Target::Naga }
    }
}

/// The full WGSL source of a kernel in a variant.
pub fn source(kernel: Kernel, variant: Variant, kv: KvStorage, target: Target) -> String {
    let subgroup = variant == Variant::Subgroup && kernel.uses_subgroups();
    let mut out = String::new();
    if kv == KvStorage::F16 {
        out.push_str("enable f16;\n");
    }
    if kernel.uses_cooperative_matrices() {
        out.push_str("enable wgpu_cooperative_matrix;\n");
    }
    if subgroup && target == Target::Browser {
        out.push_str("enable subgroups;\n");
    }
    out.push_str(match kv {
        KvStorage::F32 => "alias kv4 = vec4<f32>;\n",
        KvStorage::F16 => "alias kv4 = vec4<f16>;\n",
        // Four codes per word.
        KvStorage::Q8 => "alias kv4 = u32;\n",
    });
    // For kernels that read K/V as 16-byte words: eight elements are one word (f16) or two (f32).
    out.push_str(match kv {
        KvStorage::F32 => KV_WORDS_F32,
        KvStorage::F16 => KV_WORDS_F16,
        KvStorage::Q8 => KV_WORDS_Q8,
    });
    out.push_str(SHARED.1);
    out.push('\n');
    out.push_str(match kernel.weight_read() {
        Some(WeightRead::Float) => W_FLOAT,
        Some(WeightRead::Nibbles) => W_NIBBLES,
        Some(WeightRead::Bytes) => W_BYTES,
        Some(WeightRead::BytesOffset) => W_BYTES_OFFSET,
        None => "",
    });
    if matches!(kernel.weight_read(), Some(WeightRead::Float | WeightRead::Bytes | WeightRead::BytesOffset)) {
        out.push_str(W_STEP_ONE_VEC4);
    }
    let mut flags = Vec::new();
    if subgroup {
        flags.push("SUBGROUP");
    }
    if kv == KvStorage::Q8 {
        flags.push("Q8");
    }
    out.push_str(&preprocess(kernel.text(), &flags));
    if matches!(kernel, Kernel::Prefill | Kernel::PrefillPortable | Kernel::PrefillCoop) {
        out.push_str(&preprocess(twinfer_shaders::PREFILL_KV.1, &flags));
    }
    out
}

/// The projections' weights as stored: vec4s of the storage type.
const W_FLOAT: &str = "alias w4 = kv4;
fn load_w(f: u32, i: u32) -> vec4<f32> {
    return vec4<f32>(w[f * P.k4 + i]);
}
";
/// The GEMV's step for formats whose lanes take one vec4 at a time.
const W_STEP_ONE_VEC4: &str = "const W_STEP: u32 = 1u;
fn load_w_step(f: u32, s: u32) -> array<vec4<f32>, W_STEP> {
    return array<vec4<f32>, W_STEP>(load_w(f, s));
}
";
/// Block-quantized 4-bit weights: per feature, k / 8 words of 8 codes in input order (vec4 `i`
/// is the low or high half of word `i / 2`); from word `scales_at`, per feature and group of
/// `2^group_shift` vec4s, an f32 scale and an f32 offset: `value = scale * code + offset`. The
/// GEMV steps a whole word (two vec4s, one group: groups are 8 vec4s or more) at a time.
const W_NIBBLES: &str = "alias w4 = u32;
fn load_w(f: u32, i: u32) -> vec4<f32> {
    let half = w[f * (P.k4 / 2u) + i / 2u] >> (16u * (i & 1u));
    let c = vec4<f32>(vec4<u32>(half, half >> 4u, half >> 8u, half >> 12u) & vec4<u32>(0xfu));
    let g = P.scales_at + 2u * (f * (P.k4 >> P.group_shift) + (i >> P.group_shift));
    return c * bitcast<f32>(w[g]) + bitcast<f32>(w[g + 1u]);
}
const W_STEP: u32 = 2u;
fn load_w_step(f: u32, s: u32) -> array<vec4<f32>, W_STEP> {
    let word = w[f * (P.k4 / 2u) + s];
    let lo = vec4<f32>(vec4<u32>(word, word >> 4u, word >> 8u, word >> 12u) & vec4<u32>(0xfu));
    let hi = vec4<f32>(vec4<u32>(word >> 16u, word >> 20u, word >> 24u, word >> 28u) & vec4<u32>(0xfu));
    let g = P.scales_at + 2u * (f * (P.k4 >> P.group_shift) + ((2u * s) >> P.group_shift));
    let scale = bitcast<f32>(w[g]);
    let offset = bitcast<f32>(w[g + 1u]);
    return array<vec4<f32>, W_STEP>(lo * scale + offset, hi * scale + offset);
}
";
/// Block-quantized 8-bit weights: per feature, k / 4 words of 4 signed codes in input order;
/// from word `scales_at`, per feature and group of `2^group_shift` vec4s, an f32 scale:
/// `value = scale * code`.
const W_BYTES: &str = "alias w4 = u32;
fn load_w(f: u32, i: u32) -> vec4<f32> {
    let word = w[f * P.k4 + i];
    let bytes = bitcast<vec4<i32>>(vec4<u32>(word << 24u, word << 16u, word << 8u, word));
    let g = P.scales_at + f * (P.k4 >> P.group_shift) + (i >> P.group_shift);
    return vec4<f32>(bytes >> vec4<u32>(24u)) * bitcast<f32>(w[g]);
}
";
/// As [`W_BYTES`] with an f32 offset after each scale: `value = scale * code + offset`.
const W_BYTES_OFFSET: &str = "alias w4 = u32;
fn load_w(f: u32, i: u32) -> vec4<f32> {
    let word = w[f * P.k4 + i];
    let bytes = bitcast<vec4<i32>>(vec4<u32>(word << 24u, word << 16u, word << 8u, word));
    let g = P.scales_at + 2u * (f * (P.k4 >> P.group_shift) + (i >> P.group_shift));
    return vec4<f32>(bytes >> vec4<u32>(24u)) * bitcast<f32>(w[g]) + bitcast<f32>(w[g + 1u]);
}
";

const KV_WORDS_F32: &str = "const KV_HALF: bool = false;
fn unpack8(a: vec4<u32>, b: vec4<u32>) -> mat2x4<f32> {
    return mat2x4<f32>(bitcast<vec4<f32>>(a), bitcast<vec4<f32>>(b));
}
";
const KV_WORDS_F16: &str = "const KV_HALF: bool = true;
fn unpack8(a: vec4<u32>, b: vec4<u32>) -> mat2x4<f32> {
    return mat2x4<f32>(
        vec4<f32>(unpack2x16float(a.x), unpack2x16float(a.y)),
        vec4<f32>(unpack2x16float(a.z), unpack2x16float(a.w)),
    );
}
";

const KV_WORDS_Q8: &str = "const KV_HALF: bool = true;
// Four signed codes of a word, low byte first.
fn q8_codes(w: u32) -> vec4<f32> {
    return vec4<f32>(bitcast<vec4<i32>>(vec4<u32>(w << 24u, w << 16u, w << 8u, w)) >> vec4<u32>(24u));
}
// Eight codes (a.x, a.y) times their row's scale (the bits in a.z).
fn unpack8(a: vec4<u32>, b: vec4<u32>) -> mat2x4<f32> {
    return mat2x4<f32>(q8_codes(a.x), q8_codes(a.y)) * bitcast<f32>(a.z);
}
// Four values already divided by their row's scale, as codes: rounded half away from zero (as
// the CPU's quantizer rounds) and clamped to +-127.
fn q8_pack(x: vec4<f32>) -> u32 {
    let c = clamp(vec4<i32>(sign(x) * floor(abs(x) + 0.5)), vec4<i32>(-127), vec4<i32>(127));
    let b = bitcast<vec4<u32>>(c) & vec4<u32>(0xffu);
    return b.x | (b.y << 8u) | (b.z << 16u) | (b.w << 24u);
}
// The largest magnitude of four values.
fn q8_amax(x: vec4<f32>) -> f32 {
    let a = abs(x);
    return max(max(a.x, a.y), max(a.z, a.w));
}
";

/// Keeps the branch of each `// #if FLAG` block (`// #else`, `// #endif`; blocks nest) that the
/// set `flags` selects; other lines pass through.
fn preprocess(text: &str, flags: &[&str]) -> String {
    // Per open block: (whether its enclosing text is kept, whether its current branch is kept).
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let kept = |stack: &[(bool, bool)]| stack.last().is_none_or(|&(outer, this)| outer && this);
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let t = line.trim();
        if let Some(flag) = t.strip_prefix("// #if ") {
            let outer = kept(&stack);
            stack.push((outer, flags.contains(&flag.trim())));
        } else if t == "// #else" && !stack.is_empty() {
            let top = stack.last_mut().expect("an open block");
            top.1 = !top.1;
        } else if t == "// #endif" {
            stack.pop();
        } else if kept(&stack) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocess_keeps_one_branch() {
        let text = "a\n// #if SUBGROUP\nb\n// #else\nc\n// #endif\nd\n";
        assert_eq!(preprocess(text, &["SUBGROUP"]), "a\nb\nd\n");
        assert_eq!(preprocess(text, &[]), "a\nc\nd\n");
        let nested = "a\n// #if Q8\nb\n// #if SUBGROUP\nc\n// #else\nd\n// #endif\n// #else\ne\n// #endif\n";
        assert_eq!(preprocess(nested, &["Q8"]), "a\nb\nd\n");
        assert_eq!(preprocess(nested, &["SUBGROUP"]), "a\ne\n");
        assert_eq!(preprocess(nested, &["Q8", "SUBGROUP"]), "a\nb\nc\n");
    }

    #[test]
    fn browser_sources_enable_subgroups_only_for_subgroup_kernels() {
        // The tensor-core kernel needs subgroups whatever the variant, and is native only.
        for kernel in Kernel::ALL.into_iter().filter(|k| !k.uses_cooperative_matrices()) {
            let native = source(kernel, Variant::Subgroup, KvStorage::F32, Target::Naga);
            let web = source(kernel, Variant::Subgroup, KvStorage::F32, Target::Browser);
            assert!(!native.contains("enable subgroups;"));
            assert_eq!(web.starts_with("enable subgroups;"), kernel.uses_subgroups(), "{kernel:?}");
            let base = source(kernel, Variant::Baseline, KvStorage::F32, Target::Naga);
            assert!(!base.contains("subgroupShuffleXor(") && !base.contains("@builtin(subgroup_id)"));
        }
        let native = source(Kernel::Decode, Variant::Subgroup, KvStorage::F32, Target::Naga);
        assert!(native.contains("subgroupShuffleXor("));
    }
}

//! The adapter and device: chosen once, with the choice explained, and errors mapped to
//! [`TwinferError`] (wgpu panics on a WGPU_ADAPTER_NAME that matches nothing, so adapters are
//! checked here first).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Result, TwinferError};

/// Adapter features the engine uses when present.
const WANTED: wgpu::Features =
    wgpu::Features::SHADER_F16.union(wgpu::Features::SUBGROUP).union(wgpu::Features::TIMESTAMP_QUERY);

/// Whether the tensor-core matmul can run on `adapter`, or why not.
pub fn tensor_core_support(adapter: &wgpu::Adapter, limits: &wgpu::Limits) -> std::result::Result<(), String> {
    use wgpu::CooperativeScalarType as S;
    let info = adapter.get_info();
    let features = adapter.features();
    if !features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
        return Err("no cooperative matrices".into());
    }
    if !features.contains(wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP) {
        return Err("no shader-f16 or no subgroups".into());
    }
    // The kernel hands each of its four subgroups a quarter of the tile: that needs 32 threads
    // in every subgroup of its 128.
    if (info.subgroup_min_size, info.subgroup_max_size) != (32, 32) {
        return Err(format!(
            "subgroups of {}..={} threads, the kernel needs 32",
            info.subgroup_min_size, info.subgroup_max_size
        ));
    }
    if limits.max_compute_workgroup_storage_size < COOP_MATMUL_STORAGE {
        return Err(format!(
            "{} bytes of workgroup storage, the kernel needs {COOP_MATMUL_STORAGE}",
            limits.max_compute_workgroup_storage_size
        ));
    }
    let has = adapter
        .cooperative_matrix_properties()
        .iter()
        .any(|p| (p.m_size, p.n_size, p.k_size) == (16, 16, 16) && p.ab_type == S::F16 && p.cr_type == S::F32);
    if !has {
        return Err("no 16 x 16 x 16 f16 cooperative matrix with f32 accumulators".into());
    }
    Ok(())
}

/// Workgroup storage of `linear_matmul_coop.wgsl`.
pub const COOP_MATMUL_STORAGE: u32 = 8 * 1024;

/// Workgroup storage of `prefill_attention_coop.wgsl` (a 64-key tile's K or P and its V, 18 and 17
/// KiB with padded rows; 9 KiB of scores; a 16-byte flag): adapters with less run prefill on the FMA
/// kernel.
pub const PREFILL_COOP_STORAGE: u32 = 45072;

/// What was chosen, for [`crate::BackendInfo`] and `twinfer info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterSummary {
    /// Adapter name (or `"<Backend> adapter"` when the browser hides it).
    pub name: String,
    /// Graphics API, lower case (`vulkan`, `metal`, `dx12`, `browserwebgpu`, ...).
    pub backend: String,
    /// wgpu device type (`DiscreteGpu`, `IntegratedGpu`, `Cpu`, ...).
    pub device_type: String,
    /// Driver name and version.
    pub driver: String,
    /// The device has `shader-f16` (f16 storage in the shaders).
    pub shader_f16: bool,
    /// The device has subgroup operations.
    pub subgroups: bool,
    /// Smallest and largest subgroup size the adapter reports.
    pub subgroup_sizes: (u32, u32),
    /// The device has timestamp queries (GPU timing).
    pub timestamps: bool,
    /// The adapter offers cooperative matrices (tensor cores).
    pub cooperative_matrix: bool,
    /// The device runs the tensor-core matmul of prompt chunks (`linear_matmul_coop.wgsl`): the
    /// adapter has 16 x 16 x 16 cooperative matrices of f16 with f32 accumulators, f16 shaders and
    /// subgroups of exactly 32 threads.
    pub tensor_cores: bool,
    /// Largest storage buffer binding, in bytes.
    pub max_storage_binding: u64,
    /// Workgroup shared memory, in bytes.
    pub max_workgroup_storage: u32,
    /// Most invocations per workgroup.
    pub max_invocations: u32,
}

impl std::fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}, {}, driver {}); shader-f16 {}, subgroups {} (sizes {}..={}), timestamps {}, \
             cooperative matrix {} (tensor-core matmul {}); max storage binding {} MiB, workgroup storage {} KiB, {} invocations",
            self.name,
            self.backend,
            self.device_type,
            self.driver,
            yes(self.shader_f16),
            yes(self.subgroups),
            self.subgroup_sizes.0,
            self.subgroup_sizes.1,
            yes(self.timestamps),
            yes(self.cooperative_matrix),
            yes(self.tensor_cores),
            self.max_storage_binding >> 20,
            self.max_workgroup_storage >> 10,
            self.max_invocations
        )
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Counts of created GPU objects: a decode loop after warm-up must add none.
#[derive(Debug, Default)]
pub struct Counters {
    pub buffers: AtomicU64,
    pub bind_groups: AtomicU64,
    pub pipelines: AtomicU64,
    pub submits: AtomicU64,
    /// Compute dispatches recorded.
    pub dispatches: AtomicU64,
    /// Copies to the host, and their bytes.
    pub readbacks: AtomicU64,
    pub readback_bytes: AtomicU64,
    /// Resident model steps submitted.
    pub steps: AtomicU64,
    /// Host nanoseconds spent recording resident steps, from `record_step` to the end of
    /// `submit` (native only: the GPU is idle meanwhile unless a previous step still runs).
    pub record_ns: AtomicU64,
}

/// A snapshot of the object counts in [`GpuContext::counters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResourceCounts {
    /// Buffers created.
    pub buffers: u64,
    /// Bind groups created.
    pub bind_groups: u64,
    /// Compute pipelines created.
    pub pipelines: u64,
    /// Queue submissions.
    pub submits: u64,
    /// Compute dispatches recorded.
    pub dispatches: u64,
    /// Copies to the host.
    pub readbacks: u64,
    /// Bytes copied to the host.
    pub readback_bytes: u64,
    /// Resident model steps submitted.
    pub steps: u64,
    /// Host nanoseconds spent recording resident steps.
    pub record_ns: u64,
}

impl Counters {
    pub fn snapshot(&self) -> ResourceCounts {
        ResourceCounts {
            buffers: self.buffers.load(Ordering::Relaxed),
            bind_groups: self.bind_groups.load(Ordering::Relaxed),
            pipelines: self.pipelines.load(Ordering::Relaxed),
            submits: self.submits.load(Ordering::Relaxed),
            dispatches: self.dispatches.load(Ordering::Relaxed),
            readbacks: self.readbacks.load(Ordering::Relaxed),
            readback_bytes: self.readback_bytes.load(Ordering::Relaxed),
            steps: self.steps.load(Ordering::Relaxed),
            record_ns: self.record_ns.load(Ordering::Relaxed),
        }
    }
}

/// One device and queue, shared by every engine built from it.
#[derive(Debug)]
pub struct GpuContext {
    /// The wgpu device.
    pub device: wgpu::Device,
    /// Its queue.
    pub queue: wgpu::Queue,
    /// The adapter that was chosen, for reports.
    pub summary: AdapterSummary,
    /// The adapter's limits, all requested for the device.
    pub limits: wgpu::Limits,
    /// Optional features that were enabled (`shader-f16`, subgroups, timestamps, where present).
    pub features: wgpu::Features,
    /// Counts of GPU objects created, to check that steady-state decode creates none.
    pub counters: Counters,
    lost: Arc<Mutex<Option<String>>>,
    lost_flag: Arc<AtomicBool>,
}

impl GpuContext {
    /// Opens the adapter named by `WGPU_ADAPTER_NAME` (and `WGPU_BACKEND`), else the default one.
    /// Blocks; in a browser it fails with `WouldBlock` (use [`GpuContext::open_async`]).
    pub fn open() -> Result<Arc<Self>> {
        crate::wait::block_on("GpuContext::open", Self::open_async())?
    }

    /// Opens the device without blocking: natively as [`GpuContext::open`], in a browser through
    /// `navigator.gpu` (`GpuUnavailable` when the browser has no WebGPU).
    pub async fn open_async() -> Result<Arc<Self>> {
        let adapter = adapter().await?;
        let info = adapter.get_info();
        let limits = adapter.limits();
        let tensor_cores = tensor_core_support(&adapter, &limits).is_ok();
        let mut features = adapter.features() & WANTED;
        if tensor_cores {
            features |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("twinfer"),
                required_features: features,
                required_limits: limits.clone(),
                // SAFETY: the one experimental feature asked for is cooperative matrices, used
                // only by `linear_matmul_coop.wgsl` with the configuration checked above.
                experimental_features: if tensor_cores {
                    unsafe { wgpu::ExperimentalFeatures::enabled() }
                } else {
                    wgpu::ExperimentalFeatures::disabled()
                },
                ..Default::default()
            })
            .await
            .map_err(|e| TwinferError::GpuUnavailable(format!("{}: request_device failed: {e}", info.name)))?;
        let summary = AdapterSummary {
            // Browsers may hide the adapter's description.
            name: if info.name.is_empty() { format!("{:?} adapter", info.backend) } else { info.name.clone() },
            backend: format!("{:?}", info.backend).to_lowercase(),
            device_type: format!("{:?}", info.device_type),
            driver: format!("{} {}", info.driver, info.driver_info).trim().to_string(),
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            subgroup_sizes: (info.subgroup_min_size, info.subgroup_max_size),
            timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
            cooperative_matrix: adapter.features().contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX),
            tensor_cores,
            max_storage_binding: limits.max_storage_buffer_binding_size as u64,
            max_workgroup_storage: limits.max_compute_workgroup_storage_size,
            max_invocations: limits.max_compute_invocations_per_workgroup,
        };
        let lost = Arc::new(Mutex::new(None));
        let lost_flag = Arc::new(AtomicBool::new(false));
        {
            let (lost, flag) = (lost.clone(), lost_flag.clone());
            device.set_device_lost_callback(move |reason, msg| {
                if let Ok(mut l) = lost.lock() {
                    *l = Some(format!("{reason:?}: {msg}"));
                }
                flag.store(true, Ordering::Release);
            });
        }
        // Errors are caught by error scopes per call; anything that escapes is only logged, so that
        // a stray error never aborts the host process.
        device.on_uncaptured_error(Arc::new(|e| eprintln!("twinfer: uncaptured GPU error: {e}")));
        Ok(Arc::new(Self { device, queue, summary, limits, features, counters: Counters::default(), lost, lost_flag }))
    }

    /// `Err(DeviceLost)` once the device is gone: the caller can continue on the CPU engine.
    pub fn check_alive(&self) -> Result<()> {
        // A non-blocking poll is what lets wgpu notice a loss and run the lost callback; in a
        // browser the callback comes from the event loop instead.
        #[cfg(not(target_arch = "wasm32"))]
        if !self.lost_flag.load(Ordering::Acquire)
            && let Err(e) = self.device.poll(wgpu::PollType::Poll)
        {
            return Err(self.mark_lost(&e.to_string()));
        }
        if self.lost_flag.load(Ordering::Acquire) {
            let why = self.lost.lock().ok().and_then(|l| l.clone()).unwrap_or_default();
            return Err(TwinferError::DeviceLost(why));
        }
        Ok(())
    }

    /// Destroys the device, as a driver reset would (for tests of the CPU fallback). Nothing is
    /// marked here: the engine learns of the loss the way it would of a real one, from wgpu's
    /// lost callback or from a submission, wait or readback that fails.
    pub fn destroy_for_test(&self) {
        self.device.destroy();
    }

    /// Records that the device is gone (the first reason wins) and returns the error to report.
    pub fn mark_lost(&self, why: &str) -> TwinferError {
        self.lost_flag.store(true, Ordering::Release);
        if let Ok(mut l) = self.lost.lock() {
            l.get_or_insert_with(|| why.to_string());
        }
        TwinferError::DeviceLost(why.to_string())
    }

    /// Waits for all submitted work; a failure means the device is gone.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn wait(&self) -> Result<()> {
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| self.mark_lost(&e.to_string()))?;
        self.check_alive()
    }

    /// Runs `make` inside an error scope of `filter` and returns what the scope caught. Natively
    /// that result is there at once. A browser delivers it only after control returns to the event
    /// loop, so there no scope is pushed: the call's own scopes (popped at its end) catch it.
    pub fn scoped<T>(&self, filter: wgpu::ErrorFilter, make: impl FnOnce() -> T) -> (T, Option<wgpu::Error>) {
        #[cfg(not(target_arch = "wasm32"))]
        {
            let scope = self.device.push_error_scope(filter);
            let made = make();
            (made, pollster::block_on(scope.pop()))
        }
        #[cfg(target_arch = "wasm32")]
        {
            let _ = filter;
            (make(), None)
        }
    }
}

/// The adapter named by `WGPU_ADAPTER_NAME` (and `WGPU_BACKEND`), else the default one.
#[cfg(not(target_arch = "wasm32"))]
async fn adapter() -> Result<wgpu::Adapter> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    if let Ok(wanted) = std::env::var("WGPU_ADAPTER_NAME") {
        let names: Vec<String> =
            instance.enumerate_adapters(wgpu::Backends::all()).await.iter().map(|a| a.get_info().name).collect();
        if !names.iter().any(|n| n.to_lowercase().contains(&wanted.to_lowercase())) {
            return Err(TwinferError::GpuUnavailable(format!(
                "WGPU_ADAPTER_NAME={wanted} matches no adapter (found: {})",
                if names.is_empty() { "none".to_string() } else { names.join(", ") }
            )));
        }
    }
    wgpu::util::initialize_adapter_from_env_or_default(&instance, None)
        .await
        .map_err(|e| TwinferError::GpuUnavailable(format!("no GPU adapter: {e}")))
}

/// The threaded wasm build shares its memory with worker threads, and wgpu's WebGPU handles belong
/// to the thread that made them: that build runs the CPU engine only, so no GPU object ever exists
/// in it (which is what makes `GpuEngine`'s `Send` and `Sync` impls there sound).
#[cfg(all(target_arch = "wasm32", target_feature = "atomics"))]
async fn adapter() -> Result<wgpu::Adapter> {
    Err(TwinferError::GpuUnavailable(
        "this is the multithreaded wasm build, which runs the CPU engine only; the single-threaded build has WebGPU"
            .into(),
    ))
}

/// The browser's WebGPU adapter. Checked first: without WebGPU (Node, or a browser with it off)
/// wgpu would otherwise trap.
#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
async fn adapter() -> Result<wgpu::Adapter> {
    if !wgpu::util::is_browser_webgpu_supported().await {
        return Err(TwinferError::GpuUnavailable(
            "this JavaScript environment has no WebGPU (navigator.gpu is missing or gives no adapter)".into(),
        ));
    }
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::BROWSER_WEBGPU,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    instance
        .request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            ..Default::default()
        })
        .await
        .map_err(|e| TwinferError::GpuUnavailable(format!("no WebGPU adapter: {e}")))
}

/// Maps an error caught by an error scope.
pub fn map_error(e: wgpu::Error) -> TwinferError {
    match e {
        wgpu::Error::OutOfMemory { .. } => TwinferError::GpuOutOfMemory(e.to_string()),
        wgpu::Error::Validation { description, .. } => TwinferError::GpuValidation(description),
        wgpu::Error::Internal { description, .. } => TwinferError::GpuValidation(description),
    }
}

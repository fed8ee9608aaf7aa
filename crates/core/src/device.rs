//! `--device cpu|cuda|cuda:N` (SPEC §15), shared by every binary.
use crate::{Error, Result};
use candle_core::{DType, Device};
use std::str::FromStr;

/// A parsed device request; turned into a candle [`Device`] by [`DeviceSpec::open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            _ => {
                if let Some(n) = t.strip_prefix("cuda:") {
                    n.parse::<usize>().map(DeviceSpec::Cuda).map_err(|_| {
                        Error::Arg(format!("device `{s}`: the GPU index after `cuda:` must be a number, e.g. cuda:0"))
                    })
                } else {
                    Err(Error::Arg(format!(
                        "device `{s}` is not one of cpu, cuda, cuda:N"
                    )))
                }
            }
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// The default of SPEC §11.1.7: `cuda:0` when built with CUDA and a GPU answers, else `cpu`.
    pub fn default_for_build() -> Self {
        if cuda_compiled() && open_cuda(0).is_ok() {
            DeviceSpec::Cuda(0)
        } else {
            DeviceSpec::Cpu
        }
    }

    /// Opens the device. Asking for CUDA in a CPU-only build is an error that says how to get a CUDA build.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                if !cuda_compiled() {
                    return Err(Error::Arg(format!(
                        "--device cuda:{n} needs a CUDA build; this binary was built without the `cuda` feature \
                         (build with `make build-cuda`, or use --device cpu)"
                    )));
                }
                open_cuda(n)
            }
        }
    }
}

/// `Device::new_cuda(n)` with every failure as an error: the CUDA build loads libcuda, libcublas and libcurand at
/// run time and cudarc panics when one cannot be found (no driver, libraries not on the loader path), so the panic is
/// caught here and turned into a message that says what to do.
fn open_cuda(n: usize) -> Result<Device> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(|| Device::new_cuda(n));
    std::panic::set_hook(hook);
    match r {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => {
            // candle appends a backtrace when RUST_BACKTRACE is set: keep the first line.
            let e = e.to_string();
            let first = e.lines().next().unwrap_or("").trim();
            Err(Error::Arg(format!("cannot open GPU cuda:{n}: {first}")))
        }
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .map(|s| s.as_str())
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("unknown failure");
            Err(Error::Arg(format!(
                "cannot open GPU cuda:{n}: {msg} (is an NVIDIA driver installed? CUDA libraries are loaded at run \
                 time: put their folder, e.g. /usr/local/cuda/lib64, on LD_LIBRARY_PATH)"
            )))
        }
    }
}

/// Whether this build contains candle's CUDA backend.
pub fn cuda_compiled() -> bool {
    cfg!(feature = "cuda")
}

/// Human name of an opened device for reports and bench JSON.
pub fn device_name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}

/// `--tf32 on|off` (SPEC §15): lets cuBLAS use TF32 tensor cores for f32 matrix products on CUDA (default off,
/// exact f32). No effect on CPU.
pub fn set_tf32(on: bool) {
    candle_core::cuda::set_gemm_reduced_precision_f32(on);
}

/// Parses `--tf32 on|off` (also true/false/1/0).
pub fn parse_on_off(flag: &str, s: &str) -> Result<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err(Error::Arg(format!("{flag} `{s}`: expected on or off"))),
    }
}

/// The dtype of the frozen SAM image encoder (SPEC §15, `--encoder-dtype bf16|f32`): `None` picks bf16 on CUDA and
/// f32 on CPU; bf16 on CPU is refused (candle has no bf16 convolution on CPU). Whatever the dtype, the encoder's
/// output is cast to f32 (`ImageEncoder::forward_frozen`).
pub fn encoder_dtype(requested: Option<&str>, device: &Device) -> Result<DType> {
    let dt = match requested.map(|s| s.trim().to_ascii_lowercase()) {
        None => {
            return Ok(if device.is_cuda() {
                DType::BF16
            } else {
                DType::F32
            })
        }
        Some(s) if s == "auto" => return encoder_dtype(None, device),
        Some(s) if s == "bf16" => DType::BF16,
        Some(s) if s == "f32" => DType::F32,
        Some(s) => {
            return Err(Error::Arg(format!(
                "--encoder-dtype `{s}`: expected bf16, f32 or auto"
            )))
        }
    };
    if dt == DType::BF16 && !device.is_cuda() {
        return Err(Error::Arg(
            "--encoder-dtype bf16 needs a CUDA device (candle has no bf16 convolution on CPU); use f32".into(),
        ));
    }
    Ok(dt)
}

/// GPU memory of one device in MiB: `used` = total − free now (all processes), `pool_peak` = high-water mark of the
/// memory candle allocated through the device's stream-ordered pool since the last [`reset_gpu_peak`].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct GpuMemory {
    pub total_mb: f64,
    pub used_mb: f64,
    pub pool_peak_mb: Option<f64>,
}

/// Memory figures of a CUDA device; `None` for CPU (or a CPU-only build).
pub fn gpu_memory(device: &Device) -> Option<GpuMemory> {
    #[cfg(feature = "cuda")]
    {
        cuda_mem::query(device)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        None
    }
}

/// Resets the pool high-water mark reported as [`GpuMemory::pool_peak_mb`] (no-op on CPU).
pub fn reset_gpu_peak(device: &Device) {
    #[cfg(feature = "cuda")]
    cuda_mem::reset_peak(device);
    #[cfg(not(feature = "cuda"))]
    let _ = device;
}

#[cfg(feature = "cuda")]
mod cuda_mem {
    use super::GpuMemory;
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    use candle_core::Device;

    const MB: f64 = 1024.0 * 1024.0;

    fn pool(
        device: &Device,
    ) -> Option<(
        std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>,
        sys::CUmemoryPool,
    )> {
        let Device::Cuda(d) = device else { return None };
        let ctx = d.cuda_stream().context().clone();
        ctx.bind_to_thread().ok()?;
        // SAFETY: the device handle comes from a live context.
        let pool = unsafe { result::device::get_mem_pool(ctx.cu_device()) }.ok()?;
        Some((ctx, pool))
    }

    pub(super) fn query(device: &Device) -> Option<GpuMemory> {
        let Device::Cuda(d) = device else { return None };
        let ctx = d.cuda_stream().context().clone();
        let (free, total) = ctx.mem_get_info().ok()?;
        let pool_peak_mb = pool(device).and_then(|(_ctx, p)| {
            let mut v: u64 = 0;
            // SAFETY: USED_MEM_HIGH is a cuuint64_t attribute of a valid pool.
            unsafe {
                result::mem_pool::get_attribute(
                    p,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    &mut v as *mut u64 as *mut core::ffi::c_void,
                )
            }
            .ok()
            .map(|_| v as f64 / MB)
        });
        Some(GpuMemory {
            total_mb: total as f64 / MB,
            used_mb: (total - free) as f64 / MB,
            pool_peak_mb,
        })
    }

    pub(super) fn reset_peak(device: &Device) {
        if let Some((_ctx, p)) = pool(device) {
            let mut zero: u64 = 0;
            // SAFETY: resetting USED_MEM_HIGH takes a cuuint64_t 0.
            let _ = unsafe {
                result::mem_pool::set_attribute(
                    p,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    &mut zero as *mut u64 as *mut core::ffi::c_void,
                )
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_forms() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert!("cuda:x"
            .parse::<DeviceSpec>()
            .unwrap_err()
            .to_string()
            .contains("cuda:x"));
        assert!("tpu".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn encoder_dtype_defaults_and_cpu_refusal() {
        let cpu = Device::Cpu;
        assert_eq!(encoder_dtype(None, &cpu).unwrap(), DType::F32);
        assert_eq!(encoder_dtype(Some("auto"), &cpu).unwrap(), DType::F32);
        assert_eq!(encoder_dtype(Some("F32"), &cpu).unwrap(), DType::F32);
        let e = encoder_dtype(Some("bf16"), &cpu).unwrap_err().to_string();
        assert!(e.contains("CUDA"), "{e}");
        assert!(encoder_dtype(Some("f16"), &cpu).is_err());
        assert!(parse_on_off("--tf32", "on").unwrap());
        assert!(!parse_on_off("--tf32", "OFF").unwrap());
        assert!(parse_on_off("--tf32", "maybe").is_err());
        assert_eq!(gpu_memory(&cpu), None);
        reset_gpu_peak(&cpu);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_is_a_clear_error() {
        let e = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(e.contains("without the `cuda` feature"), "{e}");
        assert_eq!(DeviceSpec::default_for_build(), DeviceSpec::Cpu);
    }
}

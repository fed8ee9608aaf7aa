//! `--device cpu|cuda|cuda:N` (SPEC §15), shared by every binary.
use crate::{Error, Result};
use candle_core::Device;
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
        if cuda_compiled() && Device::new_cuda(0).is_ok() {
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
                Device::new_cuda(n)
                    .map_err(|e| Error::Arg(format!("cannot open GPU cuda:{n}: {e}")))
            }
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

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_is_a_clear_error() {
        let e = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(e.contains("without the `cuda` feature"), "{e}");
        assert_eq!(DeviceSpec::default_for_build(), DeviceSpec::Cpu);
    }
}

//! `device = "cpu" | "cuda" | "cuda:N" | "auto"`, decided at run time.

use candle_core::Device;

/// A parsed device request (config `device`, written `cpu`, `cuda`, `cuda:N` or `auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceRequest {
    Cpu,
    Cuda(usize),
    Auto,
}

impl TryFrom<String> for DeviceRequest {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        parse_device(&s)
    }
}

impl From<DeviceRequest> for String {
    fn from(d: DeviceRequest) -> String {
        match d {
            DeviceRequest::Cpu => "cpu".into(),
            DeviceRequest::Auto => "auto".into(),
            DeviceRequest::Cuda(n) => format!("cuda:{n}"),
        }
    }
}

/// Parses the config / CLI device string.
pub fn parse_device(s: &str) -> Result<DeviceRequest, String> {
    match s {
        "cpu" => Ok(DeviceRequest::Cpu),
        "auto" => Ok(DeviceRequest::Auto),
        "cuda" => Ok(DeviceRequest::Cuda(0)),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(DeviceRequest::Cuda(n)),
            _ => Err(format!("unknown device '{s}' (cpu, cuda, cuda:N, auto)")),
        },
    }
}

/// Whether this binary was built with the `cuda` feature.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// Opens the requested device with TF32 matrix products on a GPU or not (a process-wide
/// setting of candle's cuBLAS calls); `auto` takes CUDA when built with it and a GPU answers.
/// Returns the device and a one-line description of the choice.
pub fn open_with(req: DeviceRequest, tf32: bool) -> Result<(Device, String), String> {
    let (dev, said) = open(req)?;
    if dev.is_cuda() {
        candle_core::cuda::set_gemm_reduced_precision_f32(tf32);
        if tf32 {
            return Ok((dev, format!("{said}, TF32 matmuls")));
        }
    }
    Ok((dev, said))
}

/// Opens the requested device; `auto` takes CUDA when built with it and a GPU answers.
/// Returns the device and a one-line description of the choice.
pub fn open(req: DeviceRequest) -> Result<(Device, String), String> {
    match req {
        DeviceRequest::Cpu => Ok((Device::Cpu, "cpu".into())),
        DeviceRequest::Cuda(n) => {
            if !CUDA_BUILT {
                return Err(format!(
                    "device 'cuda:{n}' requested but this flowmatch was built without CUDA (rebuild with --features cuda, see scripts/build-cuda.sh)"
                ));
            }
            Device::new_cuda(n)
                .map(|d| (d, format!("cuda:{n}")))
                .map_err(|e| {
                    format!(
                        "cannot open cuda:{n}: {}",
                        e.to_string().lines().next().unwrap_or("")
                    )
                })
        }
        DeviceRequest::Auto => {
            if CUDA_BUILT {
                if let Ok(d) = Device::new_cuda(0) {
                    return Ok((d, "cuda:0 (auto: GPU found)".into()));
                }
                return Ok((
                    Device::Cpu,
                    "cpu (auto: built with CUDA but no GPU answered)".into(),
                ));
            }
            Ok((Device::Cpu, "cpu (auto: built without CUDA)".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_cuda_without_the_feature() {
        assert_eq!(parse_device("cuda:3"), Ok(DeviceRequest::Cuda(3)));
        assert!(parse_device("tpu").is_err());
        assert!(parse_device("cuda:x").is_err());
        let (d, why) = open(DeviceRequest::Auto).unwrap();
        if !CUDA_BUILT {
            assert!(matches!(d, Device::Cpu) && why.contains("auto"));
            assert!(open(DeviceRequest::Cuda(0))
                .unwrap_err()
                .contains("without CUDA"));
        }
    }
}

//! Where and in what precision the models run, and how many images share a UNet call: the
//! `[runtime]` table of an experiment and the `--device`/`--dtype` flags (the flags override the
//! file).

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A device request: `auto`, `cpu`, `cuda` (GPU 0) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The first CUDA GPU when this binary has the `cuda` feature and a GPU answers, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!(
                    "unknown device '{other}': expected auto, cpu, cuda or cuda:N"
                )),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The floating-point type of generation (UNet, VAE, text encoder). Metrics always run in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }

    /// The default for a device: f16 on CUDA, f32 on the CPU.
    pub fn default_for(device: &Device) -> Self {
        if device.is_cuda() {
            Self::F16
        } else {
            Self::F32
        }
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" | "fp16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            other => Err(format!(
                "unknown dtype '{other}': expected f32, f16 or bf16"
            )),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        })
    }
}

macro_rules! serde_via_str {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_via_str!(DeviceSpec);
serde_via_str!(Precision);

/// The `[runtime]` table of an experiment file.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    pub device: DeviceSpec,
    /// Absent: f16 on CUDA, f32 on the CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype: Option<Precision>,
    /// Images per UNet call (jobs that share the model, the prompt and the guidance settings).
    /// Absent: the seeds of a prompt (4) on a GPU, 1 on the CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
}

/// `--device` and `--dtype`, flattened into every command that runs a model.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RuntimeArgs {
    /// auto | cpu | cuda | cuda:N (auto: the first CUDA GPU if this binary has the `cuda` feature
    /// and one answers, else the CPU).
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// f32 | f16 | bf16 for generation (default: f16 on CUDA, f32 on the CPU).
    #[arg(long)]
    pub dtype: Option<Precision>,
}

impl RuntimeArgs {
    /// The file's `[runtime]` table with these flags applied over it.
    pub fn over(&self, file: &RuntimeConfig) -> RuntimeConfig {
        RuntimeConfig {
            device: self.device.unwrap_or(file.device),
            dtype: self.dtype.or(file.dtype),
            batch: file.batch,
        }
    }
}

/// `--device` alone, for the commands that only score (metrics always run in f32).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DeviceArgs {
    /// auto | cpu | cuda | cuda:N (auto: the first CUDA GPU if this binary has the `cuda` feature
    /// and one answers, else the CPU).
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
}

impl DeviceArgs {
    /// Opens the device and says which on stderr.
    pub fn open(&self) -> anyhow::Result<candle_core::Device> {
        let (device, label) = open_device(self.device)?;
        eprintln!("device: {label} (requested {})", self.device);
        Ok(device)
    }
}

/// What a run recorded of its runtime (`plan.json`'s provenance).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeRecord {
    /// `cpu` or `cuda:N`.
    pub device: String,
    pub dtype: String,
}

/// A device and precision chosen for a run.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub device: Device,
    pub dtype: DType,
    /// How the device was asked for (`auto`, `cuda:0`, ...).
    pub requested: DeviceSpec,
    /// The device in words, as printed and recorded (`cpu`, `cuda:0`).
    pub label: String,
}

impl Runtime {
    /// The CPU in f32 (tests, tools).
    pub fn cpu() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            requested: DeviceSpec::Cpu,
            label: "cpu".into(),
        }
    }

    /// Resolves flags over a file's `[runtime]` table (the flags win).
    pub fn resolve(args: &RuntimeArgs, file: &RuntimeConfig) -> anyhow::Result<Self> {
        Self::open(&args.over(file))
    }

    /// Opens the device of a `[runtime]` table and settles its precision.
    pub fn open(config: &RuntimeConfig) -> anyhow::Result<Self> {
        let requested = config.device;
        let (device, label) = open_device(requested)?;
        let precision = config
            .dtype
            .unwrap_or_else(|| Precision::default_for(&device));
        Ok(Self {
            device,
            dtype: precision.dtype(),
            requested,
            label,
        })
    }

    /// The dtype's name (`f32`, `f16`, `bf16`).
    pub fn dtype_name(&self) -> &'static str {
        match self.dtype {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
            _ => "f32",
        }
    }

    /// What `plan.json` and every result row record.
    pub fn record(&self) -> RuntimeRecord {
        RuntimeRecord {
            device: self.label.clone(),
            dtype: self.dtype_name().into(),
        }
    }

    /// One line for the start of a command: `device: cuda:0 (requested auto), dtype: f16`.
    pub fn describe(&self) -> String {
        format!(
            "device: {} (requested {}), dtype: {}",
            self.label,
            self.requested,
            self.dtype_name()
        )
    }
}

/// The runtime a loaded model already runs on (to load a second model beside it).
pub fn runtime_of(sd: &diffusion::pipeline::StableDiffusion) -> Runtime {
    let device = sd.device().clone();
    let (requested, label) = match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => {
            (DeviceSpec::Cuda(gpu_id), format!("cuda:{gpu_id}"))
        }
        candle_core::DeviceLocation::Metal { gpu_id } => {
            (DeviceSpec::Auto, format!("metal:{gpu_id}"))
        }
        candle_core::DeviceLocation::Cpu => (DeviceSpec::Cpu, "cpu".into()),
    };
    Runtime {
        requested,
        device,
        dtype: sd.dtype(),
        label,
    }
}

/// Opens the requested device. `auto` falls back to the CPU when the binary lacks CUDA or no GPU
/// answers (candle's `cuda_if_available` errors instead when the driver is a stub); an explicit
/// `cuda` request that fails is an error that says why.
pub fn open_device(spec: DeviceSpec) -> anyhow::Result<(Device, String)> {
    match spec {
        DeviceSpec::Cpu => Ok((Device::Cpu, "cpu".into())),
        DeviceSpec::Cuda(n) => {
            if !candle_core::utils::cuda_is_available() {
                anyhow::bail!(
                    "--device cuda:{n}: this pnd was built without CUDA; rebuild with \
                     `cargo build --release --features cuda` (see the README's GPU section)"
                );
            }
            let device = Device::new_cuda(n)
                .map_err(|e| anyhow::anyhow!("--device cuda:{n}: no CUDA GPU {n} answers: {e}"))?;
            Ok((device, format!("cuda:{n}")))
        }
        DeviceSpec::Auto => {
            if candle_core::utils::cuda_is_available() {
                if let Ok(device) = Device::new_cuda(0) {
                    return Ok((device, "cuda:0".into()));
                }
            }
            Ok((Device::Cpu, "cpu".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse_and_print_back() {
        for (text, spec) in [
            ("auto", DeviceSpec::Auto),
            ("cpu", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
        ] {
            assert_eq!(text.parse::<DeviceSpec>().unwrap(), spec);
        }
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
        let err = "tpu".parse::<DeviceSpec>().unwrap_err();
        assert!(err.contains("expected auto, cpu, cuda or cuda:N"), "{err}");
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn precisions_parse_and_default_by_device() {
        assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
        assert_eq!("f16".parse::<Precision>().unwrap().dtype(), DType::F16);
        assert!("f8".parse::<Precision>().is_err());
        assert_eq!(Precision::default_for(&Device::Cpu), Precision::F32);
    }

    #[test]
    fn flags_override_the_file_and_auto_falls_back_to_the_cpu() {
        let file: RuntimeConfig =
            toml::from_str("device = \"cpu\"\ndtype = \"bf16\"\nbatch = 4").unwrap();
        assert_eq!(file.batch, Some(4));
        let rt = Runtime::resolve(&RuntimeArgs::default(), &file).unwrap();
        assert_eq!((rt.label.as_str(), rt.dtype), ("cpu", DType::BF16));
        let args = RuntimeArgs {
            device: Some(DeviceSpec::Auto),
            dtype: Some(Precision::F16),
        };
        let rt = Runtime::resolve(&args, &file).unwrap();
        assert_eq!(rt.dtype, DType::F16);
        if !candle_core::utils::cuda_is_available() {
            assert_eq!(rt.label, "cpu");
            assert!(rt.device.is_cpu());
        }
        let bad: Result<RuntimeConfig, _> = toml::from_str("device = \"tpu\"");
        assert!(bad
            .unwrap_err()
            .to_string()
            .contains("unknown device 'tpu'"));
    }

    #[test]
    fn an_explicit_cuda_request_without_cuda_is_a_clear_error() {
        if candle_core::utils::cuda_is_available() {
            return; // a CUDA build: the request may well succeed
        }
        let err = open_device(DeviceSpec::Cuda(0)).unwrap_err().to_string();
        assert!(err.contains("built without CUDA"), "{err}");
    }
}

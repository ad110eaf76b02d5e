//! GPU readings from the NVIDIA driver (NVML), behind [`DeviceReader`] so
//! that what services make of them is tested with recorded device data and
//! runs on machines without a driver. The executor turns readings into
//! inventory; the runner into its `/metrics`.

use serde::{Deserialize, Serialize};

/// One device as the driver reports it. Fields a GPU does not support
/// (ECC on consumer cards, temperature on some vGPUs) are `None`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceReading {
    pub index: u32,
    pub uuid: String,
    /// As NVML names it, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    pub memory_total_bytes: u64,
    pub memory_free_bytes: u64,
    pub utilization_percent: Option<u32>,
    pub temperature_celsius: Option<u32>,
    /// Volatile (since driver load) uncorrected ECC errors.
    pub ecc_uncorrected: Option<u64>,
}

/// A critical XID error event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct XidEvent {
    pub index: u32,
    pub xid: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("NVIDIA driver library not loadable: {0}")]
    NoDriver(#[source] nvml_wrapper::error::NvmlError),
    #[error("NVML: {0}")]
    Nvml(#[source] nvml_wrapper::error::NvmlError),
}

/// Reads devices; implemented over NVML and over recorded data.
pub trait DeviceReader: Send {
    fn read_devices(&mut self) -> Result<Vec<DeviceReading>, GpuError>;
    /// Critical XID errors since the last call.
    fn drain_xid_events(&mut self) -> Vec<XidEvent>;
}

/// The short model name placement matches on: `H100-80GB`, `L4-24GB`.
/// The size comes from the name when it says one, else from the memory.
pub fn model_name(nvml_name: &str, memory_total_bytes: u64) -> String {
    let words: Vec<&str> = nvml_name
        .split_whitespace()
        .filter(|w| {
            !matches!(
                w.to_ascii_uppercase().as_str(),
                "NVIDIA" | "TESLA" | "GEFORCE" | "QUADRO"
            )
        })
        .collect();
    let family = words.first().copied().unwrap_or("GPU");
    let size = words
        .iter()
        .find(|w| {
            let w = w.to_ascii_uppercase();
            w.ends_with("GB") && w[..w.len() - 2].chars().all(|c| c.is_ascii_digit()) && w.len() > 2
        })
        .map(|w| w.to_ascii_uppercase())
        .unwrap_or_else(|| {
            format!(
                "{}GB",
                (memory_total_bytes as f64 / (1u64 << 30) as f64).round() as u64
            )
        });
    format!("{family}-{size}")
}

/// NVML through `nvml-wrapper`. The library is loaded at run time, so this
/// compiles everywhere and fails cleanly where there is no driver.
pub struct NvmlReader {
    nvml: &'static nvml_wrapper::Nvml,
    events: Option<nvml_wrapper::EventSet<'static>>,
}

impl NvmlReader {
    pub fn open() -> Result<Self, GpuError> {
        use nvml_wrapper::error::NvmlError;
        let nvml = nvml_wrapper::Nvml::init().map_err(|e| match e {
            NvmlError::LibloadingError(_) => GpuError::NoDriver(e),
            other => GpuError::Nvml(other),
        })?;
        // One NVML handle lives as long as the process; leaking it lets the
        // event set borrow it for 'static.
        let nvml: &'static nvml_wrapper::Nvml = Box::leak(Box::new(nvml));
        let events = Self::xid_events(nvml);
        Ok(Self { nvml, events })
    }

    fn xid_events(nvml: &'static nvml_wrapper::Nvml) -> Option<nvml_wrapper::EventSet<'static>> {
        use nvml_wrapper::bitmasks::event::EventTypes;
        let mut set = nvml.create_event_set().ok()?;
        for i in 0..nvml.device_count().ok()? {
            let device = nvml.device_by_index(i).ok()?;
            set = match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
                Ok(set) => set,
                Err(e) => {
                    tracing::info!(gpu = i, "XID events unavailable: {}", e.error);
                    return None;
                }
            };
        }
        Some(set)
    }
}

impl DeviceReader for NvmlReader {
    fn read_devices(&mut self) -> Result<Vec<DeviceReading>, GpuError> {
        use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
        let err = GpuError::Nvml;
        let count = self.nvml.device_count().map_err(err)?;
        let mut out = Vec::with_capacity(count as usize);
        for index in 0..count {
            let d = self.nvml.device_by_index(index).map_err(err)?;
            let memory = d.memory_info().map_err(err)?;
            out.push(DeviceReading {
                index,
                uuid: d.uuid().map_err(err)?,
                name: d.name().map_err(err)?,
                memory_total_bytes: memory.total,
                memory_free_bytes: memory.free,
                utilization_percent: d.utilization_rates().ok().map(|u| u.gpu),
                temperature_celsius: d.temperature(TemperatureSensor::Gpu).ok(),
                ecc_uncorrected: d
                    .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
                    .ok(),
            });
        }
        Ok(out)
    }

    fn drain_xid_events(&mut self) -> Vec<XidEvent> {
        use nvml_wrapper::enums::event::XidError;
        let Some(set) = &self.events else {
            return Vec::new();
        };
        let mut out = Vec::new();
        // wait(0) returns at once; a timeout error means no more events.
        while let Ok(event) = set.wait(0) {
            let index = event.device.index().unwrap_or(u32::MAX);
            let xid = match event.event_data {
                Some(XidError::Value(v)) => v,
                _ => 0,
            };
            out.push(XidEvent { index, xid });
            if out.len() > 1024 {
                break;
            }
        }
        out
    }
}

/// Replays device data recorded with `flotilla-executor record-gpus`: one
/// frame per read, the last frame repeating.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RecordedDevices {
    pub frames: Vec<RecordedFrame>,
    #[serde(skip)]
    pub position: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RecordedFrame {
    pub devices: Vec<DeviceReading>,
    #[serde(default)]
    pub xid_events: Vec<XidEvent>,
}

impl RecordedDevices {
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    fn frame(&self) -> Option<&RecordedFrame> {
        self.frames
            .get(self.position.min(self.frames.len().saturating_sub(1)))
    }
}

impl DeviceReader for RecordedDevices {
    fn read_devices(&mut self) -> Result<Vec<DeviceReading>, GpuError> {
        let devices = self.frame().map(|f| f.devices.clone()).unwrap_or_default();
        self.position += 1;
        Ok(devices)
    }

    fn drain_xid_events(&mut self) -> Vec<XidEvent> {
        self.frame()
            .map(|f| f.xid_events.clone())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_are_short_and_sized() {
        assert_eq!(
            model_name("NVIDIA H100 80GB HBM3", 85_520_809_984),
            "H100-80GB"
        );
        assert_eq!(model_name("NVIDIA L4", 24_152_899_584), "L4-22GB");
        assert_eq!(model_name("Tesla T4", 16_106_127_360), "T4-15GB");
        assert_eq!(
            model_name("NVIDIA A100-SXM4-40GB", 42_505_273_344),
            "A100-SXM4-40GB-40GB"
        );
    }

    #[test]
    fn recorded_frames_replay_in_order_and_the_last_repeats() {
        let mut reader = RecordedDevices::from_json(RECORDED).unwrap();
        assert_eq!(reader.read_devices().unwrap().len(), 2);
        assert_eq!(reader.read_devices().unwrap().len(), 2);
        assert_eq!(reader.read_devices().unwrap().len(), 1);
        assert_eq!(reader.read_devices().unwrap().len(), 1);
    }

    #[test]
    fn nvml_without_a_driver_is_an_error_not_a_crash() {
        // On machines with a driver this opens; without one it must say so.
        match NvmlReader::open() {
            Ok(mut r) => {
                assert!(r.read_devices().is_ok());
            }
            Err(e) => assert!(
                matches!(e, GpuError::NoDriver(_) | GpuError::Nvml(_)),
                "{e}"
            ),
        }
    }

    /// Two H100s as NVML reported them, in three frames.
    pub const RECORDED: &str = include_str!("../tests/fixtures/nvml-2xh100.json");
}

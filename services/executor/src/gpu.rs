//! GPU telemetry for the heartbeat: NVML readings ([`flotilla_gpu`]) turned
//! into inventory, with XID errors counted per device.

use std::collections::BTreeMap;

use flotilla_proto::v1::GpuDevice;

pub use flotilla_gpu::{
    DeviceReader, DeviceReading, GpuError, NvmlReader, RecordedDevices, RecordedFrame, XidEvent,
    model_name,
};

/// Turns readings into the heartbeat's devices, counting XID errors per
/// device for the life of the executor.
#[derive(Debug, Default)]
pub struct GpuTelemetry {
    xid_counts: BTreeMap<u32, u64>,
}

impl GpuTelemetry {
    pub fn sample(&mut self, reader: &mut dyn DeviceReader) -> Result<Vec<GpuDevice>, GpuError> {
        for event in reader.drain_xid_events() {
            tracing::warn!(gpu = event.index, xid = event.xid, "critical XID error");
            *self.xid_counts.entry(event.index).or_default() += 1;
        }
        let readings = reader.read_devices()?;
        Ok(readings
            .into_iter()
            .map(|r| GpuDevice {
                index: r.index,
                model: model_name(&r.name, r.memory_total_bytes),
                uuid: r.uuid,
                memory_total_bytes: r.memory_total_bytes,
                memory_free_bytes: r.memory_free_bytes.min(r.memory_total_bytes),
                utilization_percent: r.utilization_percent.unwrap_or(0).min(100),
                temperature_celsius: r.temperature_celsius.unwrap_or(0),
                ecc_errors: r.ecc_uncorrected.unwrap_or(0),
                xid_errors: self.xid_counts.get(&r.index).copied().unwrap_or(0),
                allocated: false,
                // One host: the executor's own.
                node: String::new(),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECORDED: &str = include_str!("../../../crates/gpu/tests/fixtures/nvml-2xh100.json");

    #[test]
    fn recorded_devices_become_inventory() {
        let mut reader = RecordedDevices::from_json(RECORDED).unwrap();
        let mut telemetry = GpuTelemetry::default();
        let gpus = telemetry.sample(&mut reader).unwrap();
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0].model, "H100-80GB");
        assert_eq!(gpus[0].uuid, "GPU-5b3a6d8e-1f0c-4a7e-9c2d-3e8f4b6a1c70");
        assert!(gpus[0].memory_free_bytes < gpus[0].memory_total_bytes);
        assert_eq!(gpus[1].utilization_percent, 87);
        assert_eq!(
            gpus.iter()
                .map(|g| g.xid_errors + g.ecc_errors)
                .sum::<u64>(),
            0
        );

        // Second frame: an XID 79 (fallen off the bus) on GPU 1.
        let gpus = telemetry.sample(&mut reader).unwrap();
        assert_eq!(gpus[1].xid_errors, 1);
        assert_eq!(gpus[0].xid_errors, 0);
        // Third frame: GPU 1 gone, the count stays with the executor.
        let gpus = telemetry.sample(&mut reader).unwrap();
        assert_eq!(gpus.len(), 1);
    }

    #[test]
    fn unsupported_fields_read_as_zero() {
        let mut reader = RecordedDevices {
            frames: vec![RecordedFrame {
                devices: vec![DeviceReading {
                    index: 0,
                    uuid: "GPU-x".into(),
                    name: "NVIDIA L4".into(),
                    memory_total_bytes: 100,
                    memory_free_bytes: 200,
                    utilization_percent: None,
                    temperature_celsius: None,
                    ecc_uncorrected: None,
                }],
                xid_events: vec![],
            }],
            position: 0,
        };
        let gpus = GpuTelemetry::default().sample(&mut reader).unwrap();
        assert_eq!(gpus[0].ecc_errors, 0);
        assert_eq!(gpus[0].memory_free_bytes, 100, "free is clamped to total");
    }
}

//! The inventory an executor declares in its configuration: for simulated
//! clusters (the local fleet) and clusters without an NVIDIA driver.

use std::collections::BTreeMap;
use std::fmt;

use flotilla_proto::v1::{self, GpuDevice, TaintEffect};

const GIB: u64 = 1 << 30;

/// GPUs declared as `COUNTxMODEL-SIZEGB`, comma-separated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeclaredGpus {
    /// (count, model, memory per GPU in bytes)
    pub groups: Vec<(u32, String, u64)>,
}

impl DeclaredGpus {
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut groups = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (count, model) = part
                .split_once(['x', 'X'])
                .ok_or_else(|| format!("{part:?} is not COUNTxMODEL-SIZEGB, e.g. 2xH100-80GB"))?;
            let count: u32 = count
                .trim()
                .parse()
                .map_err(|_| format!("{part:?}: {count:?} is not a GPU count"))?;
            if count == 0 || count > 1024 {
                return Err(format!("{part:?}: GPU count must be 1 to 1024"));
            }
            let model = model.trim();
            let size = model
                .rsplit_once('-')
                .and_then(|(_, size)| {
                    size.to_ascii_uppercase()
                        .strip_suffix("GB")
                        .map(str::to_string)
                })
                .and_then(|gb| gb.parse::<u64>().ok())
                .filter(|gb| *gb > 0 && *gb <= 4096)
                .ok_or_else(|| {
                    format!("{part:?}: the model must end in its memory, e.g. H100-80GB")
                })?;
            groups.push((count, model.to_string(), size * GIB));
        }
        Ok(Self { groups })
    }

    pub fn count(&self) -> u32 {
        self.groups.iter().map(|g| g.0).sum()
    }

    /// The declared devices, idle and error-free.
    pub fn devices(&self, cluster: &str) -> Vec<GpuDevice> {
        let mut out = Vec::new();
        for (count, model, memory) in &self.groups {
            for _ in 0..*count {
                let index = u32::try_from(out.len()).unwrap_or(u32::MAX);
                out.push(GpuDevice {
                    index,
                    uuid: format!("declared-{cluster}-{index}"),
                    model: model.clone(),
                    memory_total_bytes: *memory,
                    memory_free_bytes: *memory,
                    ..Default::default()
                });
            }
        }
        out
    }
}

impl fmt::Display for DeclaredGpus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.groups.is_empty() {
            return f.write_str("no GPUs");
        }
        let parts: Vec<_> = self
            .groups
            .iter()
            .map(|(n, m, _)| format!("{n}x{m}"))
            .collect();
        f.write_str(&parts.join(", "))
    }
}

/// `key=value` pairs.
pub fn parse_labels(items: &[String]) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for item in items.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?} is not key=value"))?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() || k.len() > 63 || v.len() > 63 {
            return Err(format!(
                "{item:?}: keys must be 1-63 characters, values at most 63"
            ));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// `key=value:Effect` or `key:Effect`.
pub fn parse_taints(items: &[String]) -> Result<Vec<v1::Taint>, String> {
    let mut out = Vec::new();
    for item in items.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let (kv, effect) = item
            .rsplit_once(':')
            .ok_or_else(|| format!("{item:?} is not key=value:Effect"))?;
        let effect =
            flotilla_proto::json::value_of::<TaintEffect>(effect.trim()).ok_or_else(|| {
                format!("{item:?}: effect must be NoSchedule, PreferNoSchedule or NoExecute")
            })?;
        let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
        if key.trim().is_empty() {
            return Err(format!("{item:?}: the key is empty"));
        }
        out.push(v1::Taint {
            key: key.trim().to_string(),
            value: value.trim().to_string(),
            effect: effect.into(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gpu_declarations() {
        let d = DeclaredGpus::parse("2xH100-80GB, 1xL4-24GB").unwrap();
        assert_eq!(d.count(), 3);
        let devices = d.devices("eu-1");
        assert_eq!(devices[2].model, "L4-24GB");
        assert_eq!(devices[0].memory_total_bytes, 80 * GIB);
        assert_eq!(devices[1].uuid, "declared-eu-1-1");
        assert_eq!(DeclaredGpus::parse("").unwrap().count(), 0);
        for bad in [
            "H100-80GB",
            "0xH100-80GB",
            "twoxH100-80GB",
            "2xH100",
            "2xH100-0GB",
        ] {
            assert!(DeclaredGpus::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_labels_and_taints() {
        let labels = parse_labels(&["region=eu-west-1".into(), "env=prod".into()]).unwrap();
        assert_eq!(labels["region"], "eu-west-1");
        assert!(parse_labels(&["noequals".into()]).is_err());
        let taints = parse_taints(&[
            "spot=true:NoSchedule".into(),
            "gpu-maintenance:NoExecute".into(),
        ])
        .unwrap();
        assert_eq!(taints[0].key, "spot");
        assert_eq!(taints[0].effect(), TaintEffect::NoSchedule);
        assert_eq!(taints[1].value, "");
        assert!(parse_taints(&["spot=true:Sometimes".into()]).is_err());
    }
}

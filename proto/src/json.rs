//! The JSON form of the contracts.
//!
//! Serde code for every message is generated (see `tests/codegen.rs`); it
//! calls the helpers here for what proto3 and serde disagree on: enums are
//! written by name (the spellings of the user-facing document, `PickN`,
//! `candle`), `bytes` are base64, and a few document fields take an integer
//! or a string.
//!
//! Reading also takes the canonical proto3 JSON that protojson (Go) and
//! json_format (Python) write: enum values by their proto names
//! (`PLACEMENT_POLICY_PICK_N`) or numbers, 64-bit integers as strings, and
//! proto field names (`api_version`, as aliases in the generated code).

use base64::Engine;
use serde::de::{self, Deserializer, Visitor};
use serde::ser::Serializer;

use crate::v1;

/// An enum of the contracts with its JSON names. Value 0 (unspecified) has
/// no name: it is what an absent field means.
pub trait JsonEnum: Sized + Copy + Into<i32> + TryFrom<i32> + 'static {
    /// `(value, name)` for every value except 0.
    const NAMES: &'static [(Self, &'static str)];

    /// The value for its name in the .proto file (`RUNTIME_CANDLE`).
    fn from_proto_name(name: &str) -> Option<Self>;
}

macro_rules! json_enum {
    ($($ty:ident { $($variant:ident => $name:literal),+ $(,)? })+) => {
        /// The JSON names of the enum `flotilla.v1.<name>`, as documents
        /// write them; `None` for a type that is not one of the contracts'
        /// enums.
        pub fn document_names(name: &str) -> Option<&'static [&'static str]> {
            match name {
                $(stringify!($ty) => Some(&[$($name),+]),)+
                _ => None,
            }
        }

        $(impl JsonEnum for v1::$ty {
            const NAMES: &'static [(Self, &'static str)] = &[$((v1::$ty::$variant, $name)),+];

            fn from_proto_name(name: &str) -> Option<Self> {
                Self::from_str_name(name)
            }
        })+
    };
}

json_enum! {
    Runtime { Candle => "candle", Vllm => "vllm" }
    PlacementPolicy { PickAll => "PickAll", PickN => "PickN", PickFixed => "PickFixed" }
    LabelOperator { In => "In", NotIn => "NotIn", Exists => "Exists", DoesNotExist => "DoesNotExist" }
    PropertyOperator { Eq => "Eq", Ne => "Ne", Gt => "Gt", Ge => "Ge", Lt => "Lt", Le => "Le" }
    SortOrder { Ascending => "Ascending", Descending => "Descending" }
    WhenUnsatisfiable { DoNotSchedule => "DoNotSchedule", ScheduleAnyway => "ScheduleAnyway" }
    TolerationOperator { Equal => "Equal", Exists => "Exists" }
    TaintEffect { NoSchedule => "NoSchedule", PreferNoSchedule => "PreferNoSchedule", NoExecute => "NoExecute" }
    RolloutStrategy { RollingUpdate => "RollingUpdate", Staged => "Staged" }
    DriftPolicy { TakeOver => "TakeOver", ReportOnly => "ReportOnly" }
    AutoscalingMetric {
        InFlightPerReplica => "InFlightPerReplica", QueueDepthPerReplica => "QueueDepthPerReplica",
        TtftP95Ms => "TtftP95Ms", TokensPerSecondPerReplica => "TokensPerSecondPerReplica",
    }
    DeploymentPhase {
        Accepted => "Accepted", Placed => "Placed", Unschedulable => "Unschedulable",
        RollingOut => "RollingOut", Available => "Available", Degraded => "Degraded",
        Deleting => "Deleting",
    }
    InventorySource { Nvml => "nvml", Declared => "declared" }
    ClusterHealth { Healthy => "Healthy", Degraded => "Degraded", Unhealthy => "Unhealthy", Left => "Left" }
    PlacementOutcome { Placed => "Placed", Partial => "Partial", Unschedulable => "Unschedulable" }
    RolloutPhase {
        Progressing => "Progressing", Waiting => "Waiting", AwaitingApproval => "AwaitingApproval",
        Halted => "Halted", Complete => "Complete",
    }
    StagePhase {
        Pending => "Pending", Progressing => "Progressing", Waiting => "Waiting",
        AwaitingApproval => "AwaitingApproval", Complete => "Complete", Failed => "Failed",
    }
    ReplicaPhase {
        Pending => "Pending", Starting => "Starting", Ready => "Ready", Failed => "Failed",
        Stopping => "Stopping", Stopped => "Stopped",
    }
    ModelPhase { Provisioning => "Provisioning", Ready => "Ready", Failed => "Failed" }
    Severity { Info => "info", Warning => "warning", Error => "error" }
}

/// The JSON name of an enum value; `""` for unset or unknown values.
pub fn name_of<E: JsonEnum>(value: i32) -> &'static str {
    E::NAMES
        .iter()
        .find(|(v, _)| (*v).into() == value)
        .map_or("", |(_, n)| n)
}

/// The value for a JSON name, if it is one.
pub fn value_of<E: JsonEnum>(name: &str) -> Option<E> {
    E::NAMES.iter().find(|(_, n)| *n == name).map(|(v, _)| *v)
}

pub fn enum_name<E: JsonEnum, S: Serializer>(value: &i32, s: S) -> Result<S::Ok, S::Error> {
    match E::NAMES.iter().find(|(v, _)| (*v).into() == *value) {
        Some((_, name)) => s.serialize_str(name),
        // A value from a newer peer: keep it rather than lose it.
        None => s.serialize_i32(*value),
    }
}

pub fn enum_from_name<'de, E: JsonEnum, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    struct NameVisitor<E>(std::marker::PhantomData<E>);
    impl<E: JsonEnum> Visitor<'_> for NameVisitor<E> {
        type Value = i32;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "one of {}", expected_names::<E>())
        }
        fn visit_str<Er: de::Error>(self, v: &str) -> Result<i32, Er> {
            value_of::<E>(v)
                .or_else(|| E::from_proto_name(v))
                .map(Into::into)
                .ok_or_else(|| {
                    Er::custom(format!(
                        "unknown value \"{v}\", expected one of {}",
                        expected_names::<E>()
                    ))
                })
        }
        fn visit_i64<Er: de::Error>(self, v: i64) -> Result<i32, Er> {
            i32::try_from(v)
                .ok()
                .filter(|n| *n == 0 || E::try_from(*n).is_ok())
                .ok_or_else(|| {
                    Er::custom(format!(
                        "unknown value {v}, expected one of {}",
                        expected_names::<E>()
                    ))
                })
        }
        fn visit_u64<Er: de::Error>(self, v: u64) -> Result<i32, Er> {
            self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
        }
        fn visit_unit<Er: de::Error>(self) -> Result<i32, Er> {
            Ok(0)
        }
    }
    d.deserialize_any(NameVisitor::<E>(std::marker::PhantomData))
}

fn expected_names<E: JsonEnum>() -> String {
    E::NAMES
        .iter()
        .map(|(_, n)| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn is_unset(value: &i32) -> bool {
    *value == 0
}

/// `1` and `"1"` and `"25%"` all become a string.
pub fn int_or_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct IntOrString;
    impl Visitor<'_> for IntOrString {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an integer or a percentage such as \"25%\"")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_unit<E: de::Error>(self) -> Result<String, E> {
            Ok(String::new())
        }
    }
    d.deserialize_any(IntOrString)
}

/// `5` or `"5"`, as canonical JSON writes 64-bit integers.
pub fn u64_number_or_string<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    number_or_string(d, "an unsigned 64-bit integer")
}

/// `-5` or `"-5"`, as canonical JSON writes 64-bit integers.
pub fn i64_number_or_string<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    number_or_string(d, "a 64-bit integer")
}

fn number_or_string<'de, N, D>(d: D, what: &'static str) -> Result<N, D::Error>
where
    N: TryFrom<u64> + TryFrom<i64> + std::str::FromStr + Default,
    D: Deserializer<'de>,
{
    struct NumberOrString<N>(&'static str, std::marker::PhantomData<N>);
    impl<N> Visitor<'_> for NumberOrString<N>
    where
        N: TryFrom<u64> + TryFrom<i64> + std::str::FromStr + Default,
    {
        type Value = N;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "{}, as a number or a string", self.0)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<N, E> {
            N::try_from(v).map_err(|_| E::custom(format!("{v} is not {}", self.0)))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<N, E> {
            N::try_from(v).map_err(|_| E::custom(format!("{v} is not {}", self.0)))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<N, E> {
            v.trim()
                .parse()
                .map_err(|_| E::custom(format!("\"{v}\" is not {}", self.0)))
        }
        fn visit_unit<E: de::Error>(self) -> Result<N, E> {
            Ok(N::default())
        }
    }
    d.deserialize_any(NumberOrString(what, std::marker::PhantomData))
}

pub mod base64_bytes {
    use super::*;

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text: String = serde::Deserialize::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(|e| de::Error::custom(format!("not base64: {e}")))
    }
}

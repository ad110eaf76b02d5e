//! `spec.engine` and `spec.driftPolicy`: how a replica's engine runs in its
//! cluster. Nothing here is placement's business; the checks are the ones
//! Kubernetes would apply later, made at apply time so that a typo is
//! refused with the field's name instead of surfacing as a pod that never
//! starts.

use flotilla_proto::v1::{self, TolerationOperator};

use crate::{FieldError, bad};

const FIELD: &str = "spec.engine";

/// Engine arguments the executor sets itself, from placement's sizing or
/// from a field of their own: given again in `extraArgs` they would
/// contradict it.
const MANAGED_ARGS: [(&str, &str, &str); 7] = [
    (
        "--tensor-parallel-size",
        "-tp",
        "is set from placement's sizing",
    ),
    (
        "--pipeline-parallel-size",
        "-pp",
        "is set from placement's sizing",
    ),
    ("--max-model-len", "", "use spec.engine.maxModelLen"),
    (
        "--gpu-memory-utilization",
        "",
        "use spec.engine.gpuMemoryUtilization",
    ),
    ("--quantization", "-q", "use spec.engine.quantization"),
    ("--port", "", "is the executor's, which probes it"),
    ("--host", "", "is the executor's, which probes it"),
];

/// Checks `spec.engine` for a deployment served by `runtime`.
pub(crate) fn check_engine(
    engine: &v1::EngineSpec,
    runtime: v1::Runtime,
) -> Result<(), FieldError> {
    if engine
        .image
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return bad(
            format!("{FIELD}.image"),
            format!("{:?} contains whitespace", engine.image),
        );
    }
    let vllm = runtime == v1::Runtime::Vllm;
    let g = engine.gpu_memory_utilization;
    if g != 0.0 && !(g.is_finite() && g > 0.0 && g <= 1.0) {
        return bad(
            format!("{FIELD}.gpuMemoryUtilization"),
            format!("{g} must be above 0 and at most 1 (a share of each GPU's memory)"),
        );
    }
    if g != 0.0 && !vllm {
        return bad(
            format!("{FIELD}.gpuMemoryUtilization"),
            "is a vLLM setting; spec.runtime is not vllm",
        );
    }
    if !engine.quantization.is_empty() {
        if !vllm {
            return bad(
                format!("{FIELD}.quantization"),
                "is a vLLM setting; spec.runtime is not vllm",
            );
        }
        if !engine
            .quantization
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return bad(
                format!("{FIELD}.quantization"),
                format!(
                    "{:?} is not a vLLM quantization name such as awq or fp8",
                    engine.quantization
                ),
            );
        }
    }
    for (i, arg) in engine.extra_args.iter().enumerate() {
        let f = format!("{FIELD}.extraArgs[{i}]");
        if !vllm {
            return bad(f, "engine arguments are for vLLM; spec.runtime is not vllm");
        }
        if arg.is_empty() {
            return bad(f, "is empty");
        }
        let flag = arg.split_once('=').map_or(arg.as_str(), |(flag, _)| flag);
        if let Some((name, _, why)) = MANAGED_ARGS
            .iter()
            .find(|(long, short, _)| flag == *long || (!short.is_empty() && flag == *short))
        {
            return bad(f, format!("{name} {why}"));
        }
    }
    for name in engine.env.keys() {
        check_env_name(&format!("{FIELD}.env"), name)?;
    }
    let mut secret_names = std::collections::HashSet::new();
    for (i, s) in engine.secret_env.iter().enumerate() {
        let f = format!("{FIELD}.secretEnv[{i}]");
        check_env_name(&format!("{f}.name"), &s.name)?;
        if engine.env.contains_key(&s.name) {
            return bad(
                format!("{f}.name"),
                format!("{} is also in spec.engine.env", s.name),
            );
        }
        if !secret_names.insert(&s.name) {
            return bad(format!("{f}.name"), format!("{} is given twice", s.name));
        }
        check_dns_subdomain(&format!("{f}.secret"), &s.secret, "a Secret name")?;
        check_secret_key(&format!("{f}.key"), &s.key)?;
    }
    if let Some(r) = &engine.resources {
        let f = format!("{FIELD}.resources");
        let pairs = [
            ("cpuRequest", &r.cpu_request, "cpuLimit", &r.cpu_limit),
            (
                "memoryRequest",
                &r.memory_request,
                "memoryLimit",
                &r.memory_limit,
            ),
        ];
        for (request_name, request, limit_name, limit) in pairs {
            let request_value = parse_quantity(&format!("{f}.{request_name}"), request)?;
            let limit_value = parse_quantity(&format!("{f}.{limit_name}"), limit)?;
            if let (Some(rv), Some(lv)) = (request_value, limit_value)
                && rv > lv
            {
                return bad(
                    format!("{f}.{request_name}"),
                    format!("{request} is above {limit_name} {limit}"),
                );
            }
        }
    }
    if parse_quantity(&format!("{FIELD}.shmSize"), &engine.shm_size)? == Some(0.0) {
        return bad(
            format!("{FIELD}.shmSize"),
            "is zero; leave it out for the default",
        );
    }
    for (key, value) in &engine.node_selector {
        check_label_key(&format!("{FIELD}.nodeSelector"), key)?;
        check_label_value(&format!("{FIELD}.nodeSelector.{key}"), value)?;
    }
    check_tolerations(&format!("{FIELD}.tolerations"), &engine.tolerations)?;
    if !engine.priority_class_name.is_empty() {
        check_dns_subdomain(
            &format!("{FIELD}.priorityClassName"),
            &engine.priority_class_name,
            "a PriorityClass name",
        )?;
    }
    Ok(())
}

/// `spec.driftPolicy`: unset (take over), TakeOver or ReportOnly.
pub(crate) fn check_drift_policy(value: i32) -> Result<(), FieldError> {
    match v1::DriftPolicy::try_from(value) {
        Ok(_) => Ok(()),
        Err(_) => bad(
            "spec.driftPolicy",
            format!("{value} is not a drift policy: TakeOver or ReportOnly"),
        ),
    }
}

/// Taints may be tolerated by key, by key and value, or all at once
/// (`operator: Exists` without a key), as in Kubernetes.
pub(crate) fn check_tolerations(
    field: &str,
    tolerations: &[v1::Toleration],
) -> Result<(), FieldError> {
    for (i, t) in tolerations.iter().enumerate() {
        let f = format!("{field}[{i}]");
        match t.operator() {
            TolerationOperator::Exists if !t.value.is_empty() => {
                return bad(format!("{f}.value"), "Exists takes no value");
            }
            TolerationOperator::Equal | TolerationOperator::Unspecified if t.key.is_empty() => {
                return bad(
                    format!("{f}.key"),
                    "is empty (only operator Exists may leave it empty)",
                );
            }
            _ => {}
        }
    }
    Ok(())
}

/// A C identifier, as shells and most programs expect of a variable name.
fn check_env_name(field: &str, name: &str) -> Result<(), FieldError> {
    let mut bytes = name.bytes();
    let starts_well = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if !starts_well || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return bad(
            field,
            format!(
                "{name:?} is not a variable name: letters, digits and '_', not starting with a digit"
            ),
        );
    }
    Ok(())
}

/// A Kubernetes DNS subdomain (RFC 1123): what names a Secret or a
/// PriorityClass.
fn check_dns_subdomain(field: &str, name: &str, what: &str) -> Result<(), FieldError> {
    if name.is_empty() {
        return bad(field, format!("is empty; give {what}"));
    }
    if name.len() > 253 {
        return bad(field, format!("{what} is at most 253 characters"));
    }
    let ok = name.split('.').all(|part| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !part.starts_with('-')
            && !part.ends_with('-')
    });
    if !ok {
        return bad(
            field,
            format!(
                "{name:?} is not {what}: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"
            ),
        );
    }
    Ok(())
}

/// A key of a Secret's data.
fn check_secret_key(field: &str, key: &str) -> Result<(), FieldError> {
    if key.is_empty() {
        return bad(field, "is empty; give the key in the Secret's data");
    }
    if key.len() > 253
        || !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return bad(
            field,
            format!("{key:?} is not a Secret key: letters, digits, '-', '_' and '.'"),
        );
    }
    Ok(())
}

/// A name segment of a label: at most 63 of letters, digits, '-', '_' and
/// '.', starting and ending with a letter or digit.
fn label_segment_ok(s: &str) -> bool {
    s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

/// `[prefix/]name`, the prefix a DNS subdomain.
fn check_label_key(field: &str, key: &str) -> Result<(), FieldError> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        check_dns_subdomain(field, p, "a label key prefix")?;
    }
    if !label_segment_ok(name) {
        return bad(
            field,
            format!(
                "{key:?} is not a label key: [prefix/]name, the name at most 63 letters, digits, '-', '_' or '.'"
            ),
        );
    }
    Ok(())
}

fn check_label_value(field: &str, value: &str) -> Result<(), FieldError> {
    if !value.is_empty() && !label_segment_ok(value) {
        return bad(
            field,
            format!("{value:?} is not a label value: at most 63 letters, digits, '-', '_' or '.'"),
        );
    }
    Ok(())
}

/// A Kubernetes quantity (`500m`, `4`, `1.5`, `32Gi`, `1e3`, `128M`) in
/// base units; empty is none. Resources are never negative, so a sign is
/// refused.
pub fn parse_quantity(field: &str, value: &str) -> Result<Option<f64>, FieldError> {
    if value.is_empty() {
        return Ok(None);
    }
    let refuse = || {
        bad(
            field,
            format!(
                "{value:?} is not a Kubernetes quantity such as 500m, 4, 1.5 or 32Gi (suffixes m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei)"
            ),
        )
    };
    let end = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (number, suffix) = value.split_at(end);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return refuse();
    }
    let Ok(number) = number.parse::<f64>() else {
        return refuse();
    };
    let scale = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        s => {
            // A decimal exponent: `1e3`, `2E-2`.
            let Some(exponent) = s.strip_prefix(['e', 'E']) else {
                return refuse();
            };
            let digits = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return refuse();
            }
            let Ok(exponent) = exponent.parse::<i32>() else {
                return refuse();
            };
            10f64.powi(exponent)
        }
    };
    let quantity = number * scale;
    if !quantity.is_finite() {
        return refuse();
    }
    Ok(Some(quantity))
}

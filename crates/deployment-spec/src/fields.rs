//! Field readers the document and control requests share: label selectors,
//! integers or percentages, durations.

use crate::{FieldError, LabelOp, LabelRequirement, bad};
use flotilla_proto::v1::{self, LabelOperator};
use std::time::Duration;

/// Reads a label selector; the errors name the field under `field`.
pub fn check_label_selector(
    field: &str,
    selector: &v1::LabelSelector,
) -> Result<Vec<LabelRequirement>, FieldError> {
    let mut out: Vec<LabelRequirement> = selector
        .match_labels
        .iter()
        .map(|(k, v)| LabelRequirement {
            key: k.clone(),
            op: LabelOp::In,
            values: vec![v.clone()],
        })
        .collect();
    for k in selector.match_labels.keys() {
        if k.is_empty() {
            return bad(format!("{field}.matchLabels"), "a label key is empty");
        }
    }
    for (i, expr) in selector.match_expressions.iter().enumerate() {
        let f = format!("{field}.matchExpressions[{i}]");
        if expr.key.is_empty() {
            return bad(format!("{f}.key"), "is empty");
        }
        let op = match expr.operator() {
            LabelOperator::In => LabelOp::In,
            LabelOperator::NotIn => LabelOp::NotIn,
            LabelOperator::Exists => LabelOp::Exists,
            LabelOperator::DoesNotExist => LabelOp::DoesNotExist,
            LabelOperator::Unspecified => {
                return bad(
                    format!("{f}.operator"),
                    "is required: In, NotIn, Exists or DoesNotExist",
                );
            }
        };
        match op {
            LabelOp::In | LabelOp::NotIn if expr.values.is_empty() => {
                return bad(
                    format!("{f}.values"),
                    "In and NotIn need at least one value",
                );
            }
            LabelOp::Exists | LabelOp::DoesNotExist if !expr.values.is_empty() => {
                return bad(
                    format!("{f}.values"),
                    "Exists and DoesNotExist take no values",
                );
            }
            _ => {}
        }
        out.push(LabelRequirement {
            key: expr.key.clone(),
            op,
            values: expr.values.clone(),
        });
    }
    Ok(out)
}

/// `1` or `25%` of `total`, as written in rollout fields; empty is none.
/// Percentages round up for a surge and down for unavailability, as
/// Kubernetes does.
pub fn resolve_int_or_percent(
    field: &str,
    value: &str,
    total: u32,
    round_up: bool,
) -> Result<Option<u32>, FieldError> {
    check_int_or_percent(field, value)?;
    if value.is_empty() {
        return Ok(None);
    }
    let number: u32 = value.trim_end_matches('%').parse().unwrap_or(0);
    if !value.ends_with('%') {
        return Ok(Some(number));
    }
    let scaled = u64::from(total) * u64::from(number);
    let n = if round_up {
        scaled.div_ceil(100)
    } else {
        scaled / 100
    };
    Ok(Some(u32::try_from(n).unwrap_or(u32::MAX)))
}

/// `1` or `25%` as written in rollout fields.
pub fn check_int_or_percent(field: &str, value: &str) -> Result<(), FieldError> {
    if value.is_empty() {
        return Ok(());
    }
    let number = value.strip_suffix('%').unwrap_or(value);
    match number.parse::<u32>() {
        Ok(n) if value.ends_with('%') && n > 100 => bad(field, format!("{value:?} is over 100%")),
        Ok(_) => Ok(()),
        Err(_) => bad(
            field,
            format!("{value:?} is neither a count nor a percentage such as 25%"),
        ),
    }
}

pub(crate) fn check_duration(field: &str, value: &str) -> Result<(), FieldError> {
    parse_duration(field, value).map(|_| ())
}

/// `60s`, `5m`, `1h` or `250ms` as written in rollout fields; empty is none.
pub fn parse_duration(field: &str, value: &str) -> Result<Option<Duration>, FieldError> {
    if value.is_empty() {
        return Ok(None);
    }
    let (number, unit) = value.split_at(
        value
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(value.len()),
    );
    let scale = |n: u64, ms: u64| Ok(Some(Duration::from_millis(n.saturating_mul(ms))));
    match (number.parse::<u64>(), unit) {
        (Ok(n), "ms") => scale(n, 1),
        (Ok(n), "s") => scale(n, 1_000),
        (Ok(n), "m") => scale(n, 60_000),
        (Ok(n), "h") => scale(n, 3_600_000),
        _ => bad(
            field,
            format!("{value:?} is not a duration such as 60s, 5m or 1h"),
        ),
    }
}

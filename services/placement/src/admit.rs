//! What an applied deployment is checked against besides its own fields:
//! the fleet. Pure, like the scheduler it asks.

use std::collections::BTreeSet;

use crate::fleet::{Availability, Commitments, Fleet};
use crate::scheduler::{Settings, place};
use crate::spec::{DeploymentRequest, FieldError, Policy};

/// Checks that need the fleet: named clusters exist, and some GPU type
/// in the fleet could ever hold the model.
pub fn validate_against_fleet(
    request: &DeploymentRequest,
    fleet: &Fleet,
    settings: &Settings,
) -> Result<(), FieldError> {
    if let Policy::Fixed(names) = &request.policy {
        for (i, n) in names.iter().enumerate() {
            if fleet.index_of(n).is_none() {
                return Err(FieldError {
                    field: format!("spec.placement.clusterNames[{i}]"),
                    reason: format!("no cluster named {n} is in the fleet"),
                });
            }
        }
    }
    if fleet.is_empty() {
        return Ok(());
    }
    // Ask the scheduler about an idealised fleet: every cluster healthy,
    // uncordoned, untainted, unlabelled and empty. If even that places
    // nothing, no GPU type of this fleet can hold the model.
    let ideal = Fleet::new(
        fleet
            .clusters
            .iter()
            .map(|c| {
                let mut c = c.clone();
                c.availability = Availability::Available;
                c.cordoned = None;
                c.taints.clear();
                for g in &mut c.gpus {
                    g.largest_free_bytes = g.memory_bytes;
                    g.allocated = 0;
                }
                c
            })
            .collect(),
    );
    let mut probe = request.clone();
    probe.required.clear();
    probe.policy = Policy::All;
    probe.replicas = 1;
    let decision = place(&probe, &ideal, &Commitments::default(), None, settings);
    if decision.assignments.is_empty() {
        let reasons: BTreeSet<String> = decision
            .exclusions
            .iter()
            .map(|e| decision.reason(e, &probe, &ideal))
            .collect();
        return Err(FieldError {
            field: "spec.resources.gpu".into(),
            reason: format!(
                "no GPU type in the fleet can ever hold it: {}",
                reasons.into_iter().collect::<Vec<_>>().join("; ")
            ),
        });
    }
    Ok(())
}

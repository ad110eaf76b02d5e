//! The rollout's outbox: the events a stored state still owes.
//!
//! A step's events are derived from states ([`announcements`]), so the
//! outbox needs no record of its own: each instance remembers the last
//! state whose events it knows to be published, and before a deployment
//! steps again it publishes what lies between that state and the stored
//! one. A failed publish is retried that way; a restarted instance first
//! reads back the last state announced from the events stream.

use std::collections::HashMap;

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use flotilla_kit::{BoxError, EventDraft};
use flotilla_proto::codec::{self, CONTENT_TYPE};
use flotilla_proto::v1::{self, RolloutState, event::Payload};

use crate::announce::{STEP_EVENTS, announcements};
use crate::{Rollouts, StepError};
use flotilla_proto::EventType;

impl Rollouts {
    /// Publishes the events `stored` owes: those between the last state
    /// this instance knows to be announced and `stored`, each with
    /// `stored` as payload.
    pub(crate) async fn announce(
        &self,
        name: &str,
        stored: Option<&RolloutState>,
        announced: &mut HashMap<String, Option<RolloutState>>,
    ) -> Result<(), StepError> {
        let Some(stored) = stored else {
            announced.insert(name.to_string(), None);
            return Ok(());
        };
        let last = match announced.get(name) {
            Some(last) if last.as_ref() == Some(stored) => return Ok(()),
            Some(last) => last.clone(),
            None => self.last_announced(name, stored).await?,
        };
        for a in announcements(last.as_ref(), stored) {
            let draft = EventDraft::new(a.ty, name, a.message)
                .id(a.id)
                .generation(stored.deployment_generation)
                .payload(Payload::Rollout(stored.clone()));
            self.bus
                .publish_event(draft)
                .await
                .map_err(|source| StepError::Announce {
                    deployment: name.to_string(),
                    event: a.ty,
                    source,
                })?;
        }
        announced.insert(name.to_string(), Some(stored.clone()));
        Ok(())
    }

    /// The last state of `name` whose events are all published, from the
    /// events stream: the payload of its newest step event (a step
    /// publishes in order, and only after what its state owed before).
    /// With none there, a deployment that never completed a rollout has
    /// announced nothing yet (a crash came between its first state and
    /// its first event); any other's events have aged out of the stream,
    /// and `stored` counts as announced rather than be told twice.
    async fn last_announced(
        &self,
        name: &str,
        stored: &RolloutState,
    ) -> Result<Option<RolloutState>, StepError> {
        // The common case after a restart, a state fully announced, in
        // one read: the last event `stored` itself owes carries it. No
        // event carries a newer state (a state is stored before its events).
        if let Some(last) = announcements(None, stored).last()
            && let Some((_, state)) = self.last_step_event(name, last.ty).await?
            && state == *stored
        {
            return Ok(Some(state));
        }
        let mut newest: Option<(u64, RolloutState)> = None;
        for ty in STEP_EVENTS {
            let Some((sequence, state)) = self.last_step_event(name, ty).await? else {
                continue;
            };
            if newest.as_ref().is_none_or(|(seq, _)| *seq < sequence) {
                newest = Some((sequence, state));
            }
        }
        Ok(match newest {
            Some((_, state)) => Some(state),
            None if stored.completed_generation == 0 => None,
            None => Some(stored.clone()),
        })
    }

    /// The stream sequence and rollout state of the last `ty` event about
    /// `name`, if any (one that does not decode is ignored).
    async fn last_step_event(
        &self,
        name: &str,
        ty: EventType,
    ) -> Result<Option<(u64, RolloutState)>, StepError> {
        let failed = |source: BoxError| StepError::ReadEvents {
            deployment: name.to_string(),
            source,
        };
        let subject = self
            .bus
            .subjects
            .event(ty, name)
            .map_err(|e| failed(e.into()))?;
        let message = match self.events.get_last_raw_message_by_subject(&subject).await {
            Ok(message) => message,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
            Err(e) => return Err(failed(e.into())),
        };
        let content_type = message.headers.get(CONTENT_TYPE).map(|v| v.as_str());
        match codec::decode::<v1::Event>(content_type, &message.payload) {
            Ok(v1::Event {
                payload: Some(Payload::Rollout(state)),
                ..
            }) => Ok(Some((message.sequence, state))),
            Ok(_) => Ok(None),
            Err(e) => {
                tracing::warn!(%subject, sequence = message.sequence, "stored event ignored: {e}");
                Ok(None)
            }
        }
    }
}

use flotilla_proto::EventType;
use flotilla_proto::v1::{ClusterHealth, ClusterHeartbeat, ClusterRecord};

use super::*;
use crate::lifecycle::{on_heartbeat, pending_event};

const S: i64 = 1_000;

fn policy() -> HealthPolicy {
    HealthPolicy {
        unhealthy_after_ms: 3 * S,
        left_after_ms: 600 * S,
        max_clock_skew_ms: 30 * S,
    }
}

/// A record of `name` in `health`, last heard from at `last_seen`.
fn cluster(name: &str, health: ClusterHealth, last_seen: i64) -> ClusterRecord {
    ClusterRecord {
        name: name.into(),
        health: health.into(),
        last_seen_unix_ms: last_seen,
        ..Default::default()
    }
}

fn healthy(name: &str, last_seen: i64) -> ClusterRecord {
    cluster(name, ClusterHealth::Healthy, last_seen)
}

/// A watch fed round trips every 250 ms from `from` to `to`, ok or not.
fn watched(watch: &mut HubWatch, from: i64, to: i64, ok: bool) {
    let mut at = from;
    while at <= to {
        watch.observe(ok, at - 5, at);
        at += 250;
    }
}

struct Row {
    what: &'static str,
    clusters: Vec<ClusterRecord>,
    /// Round trips: (from, to, answered).
    watch: Vec<(i64, i64, bool)>,
    now: i64,
    due: &'static [&'static str],
    held: Option<Hold>,
}

fn run(row: &Row) -> Judgement {
    let p = policy();
    let mut watch = HubWatch::new(HubWatch::gap_for(&p));
    for &(from, to, ok) in &row.watch {
        watched(&mut watch, from, to, ok);
    }
    let mut records = row.clusters.iter().map(|r| (r.name.as_str(), r));
    // Heartbeats arrived all along: the pulse is no later than the watch.
    let since = watch.watching_since(row.now);
    judge(&mut records, &HashMap::new(), since, since, row.now, &p)
}

#[test]
fn the_detector_blames_the_side_that_went_silent() {
    let hub_up_since_zero = vec![(0, 100 * S, true)];
    let rows = [
        Row {
            what: "one cluster silent past the window, the others heard",
            clusters: vec![
                healthy("a", 96 * S),
                healthy("b", 100 * S),
                healthy("c", 100 * S - 200),
            ],
            watch: hub_up_since_zero.clone(),
            now: 100 * S,
            due: &["a"],
            held: None,
        },
        Row {
            what: "one cluster silent, exactly at the window: not yet",
            clusters: vec![healthy("a", 97 * S), healthy("b", 100 * S)],
            watch: hub_up_since_zero.clone(),
            now: 100 * S,
            due: &[],
            held: None,
        },
        Row {
            what: "two of three silent: still theirs",
            clusters: vec![
                healthy("a", 96 * S),
                healthy("b", 95 * S),
                healthy("c", 100 * S),
            ],
            watch: hub_up_since_zero.clone(),
            now: 100 * S,
            due: &["a", "b"],
            held: None,
        },
        Row {
            what: "all silent at once: the hub's, held",
            clusters: vec![
                healthy("a", 96 * S),
                healthy("b", 96 * S),
                cluster("c", ClusterHealth::Degraded, 95 * S),
            ],
            watch: hub_up_since_zero.clone(),
            now: 100 * S,
            due: &[],
            held: Some(Hold::AllSilent { clusters: 3 }),
        },
        Row {
            what: "all live ones silent: an unhealthy one still leaves",
            clusters: vec![
                healthy("a", 96 * S),
                healthy("b", 96 * S),
                cluster("gone", ClusterHealth::Unhealthy, -600 * S),
            ],
            watch: vec![(-700 * S, 100 * S, true)],
            now: 100 * S,
            due: &["gone"],
            held: Some(Hold::AllSilent { clusters: 2 }),
        },
        Row {
            what: "a fleet of one: its silence is its own",
            clusters: vec![healthy("only", 96 * S)],
            watch: hub_up_since_zero.clone(),
            now: 100 * S,
            due: &["only"],
            held: None,
        },
        Row {
            what: "hub just started: old heartbeats are the hub's absence",
            clusters: vec![healthy("a", 40 * S), healthy("b", 41 * S)],
            watch: vec![(99 * S, 100 * S, true)],
            now: 100 * S,
            due: &[],
            held: None,
        },
        Row {
            what: "hub started 3.5 s ago: the one cluster that never spoke since is due",
            clusters: vec![healthy("a", 40 * S), healthy("b", 103 * S)],
            watch: vec![(100 * S, 103_500, true)],
            now: 103_500,
            due: &["a"],
            held: None,
        },
        Row {
            what: "server stalled: round trips fail, nothing judged",
            clusters: vec![healthy("a", 92 * S), healthy("b", 100 * S)],
            watch: vec![(0, 92 * S, true), (92_250, 100 * S, false)],
            now: 100 * S,
            due: &[],
            held: Some(Hold::NotWatching),
        },
        Row {
            what: "round trips overdue (the check itself stalled): nothing judged",
            clusters: vec![healthy("a", 92 * S), healthy("b", 100 * S)],
            watch: vec![(0, 92 * S, true)],
            now: 100 * S,
            due: &[],
            held: Some(Hold::NotWatching),
        },
        Row {
            what: "reconnected after an 8 s stall: the window starts again",
            clusters: vec![healthy("a", 92 * S), healthy("b", 92 * S)],
            watch: vec![
                (0, 92 * S, true),
                (92_250, 100 * S, false),
                (100_250, 101 * S, true),
            ],
            now: 101 * S,
            due: &[],
            held: None,
        },
        Row {
            what: "after the stall, a cluster that died during it is due a window later",
            clusters: vec![healthy("dead", 92 * S), healthy("b", 103_400)],
            watch: vec![
                (0, 92 * S, true),
                (92_250, 100 * S, false),
                (100_250, 103_500, true),
            ],
            now: 103_500,
            due: &["dead"],
            held: None,
        },
        Row {
            what: "a gap in the round trips longer than half the window breaks it",
            clusters: vec![healthy("a", 90 * S), healthy("b", 100 * S)],
            watch: vec![(0, 97 * S, true), (98_600, 100 * S, true)],
            now: 100 * S,
            due: &[],
            held: None,
        },
        Row {
            what: "an announced restart excuses the silence until it is due",
            clusters: vec![
                ClusterRecord {
                    restart_expected_by_unix_ms: 150 * S,
                    ..healthy("upgrading", 80 * S)
                },
                healthy("b", 100 * S),
            ],
            watch: hub_up_since_zero.clone(),
            now: 100 * S,
            due: &[],
            held: None,
        },
        Row {
            what: "an announced restart that overran is due",
            clusters: vec![
                ClusterRecord {
                    restart_expected_by_unix_ms: 90 * S,
                    ..healthy("upgrading", 80 * S)
                },
                healthy("b", 100 * S),
            ],
            watch: hub_up_since_zero.clone(),
            now: 100 * S,
            due: &["upgrading"],
            held: None,
        },
    ];
    for row in &rows {
        let judgement = run(row);
        let due: Vec<&str> = judgement.due.iter().map(String::as_str).collect();
        assert_eq!(due, row.due, "{}", row.what);
        assert_eq!(judgement.held, row.held, "{}", row.what);
    }
}

fn heartbeat(sequence: u64, instance: &str) -> ClusterHeartbeat {
    ClusterHeartbeat {
        cluster: "flappy".into(),
        sequence,
        executor_instance: instance.into(),
        inventory: Some(Default::default()),
        ..Default::default()
    }
}

/// The record after the checks the shell would make between `from` and
/// `to`, every 250 ms, with the hub watching throughout.
fn checked(
    mut record: ClusterRecord,
    others: &[ClusterRecord],
    from: i64,
    to: i64,
) -> ClusterRecord {
    let p = policy();
    let mut at = from;
    while at <= to {
        let mut all = others
            .iter()
            .chain(std::iter::once(&record))
            .map(|r| (r.name.as_str(), r));
        let judgement = judge(&mut all, &HashMap::new(), Some(0), Some(0), at, &p);
        if judgement.due.iter().any(|n| n == "flappy") {
            record = on_tick(&record, at, 0, &p).unwrap_or(record);
        }
        at += 250;
    }
    record
}

#[test]
fn a_flapping_cluster_is_judged_each_time_and_its_recovery_is_dated() {
    let steady = [healthy("steady", 1_000 * S)];
    let mut r = on_heartbeat(None, &heartbeat(1, "x"), 0).unwrap();
    let mut transitions = Vec::new();
    let mut seq = 1;
    for round in 0..3 {
        let start = round * 10 * S;
        // Silent for 3.5 s: unhealthy once, however many checks see it.
        let before = r.generation;
        r = checked(r, &steady, start, start + 3_500);
        assert_eq!(r.health(), ClusterHealth::Unhealthy, "round {round}");
        assert_eq!(r.generation, before + 1, "round {round}: one transition");
        transitions.push(pending_event(&r));
        // Back: healthy, with the moment of recovery for placement's
        // flap probation.
        seq += 1;
        r = on_heartbeat(Some(&r), &heartbeat(seq, "x"), start + 5 * S).unwrap();
        assert_eq!(r.health(), ClusterHealth::Healthy);
        assert_eq!(r.recovered_at_unix_ms, start + 5 * S);
        transitions.push(pending_event(&r));
        // Heartbeats go on until the next round's silence.
        for t in (start + 5_250..start + 10 * S).step_by(250) {
            seq += 1;
            r = on_heartbeat(Some(&r), &heartbeat(seq, "x"), t).unwrap();
        }
    }
    let unhealthy = Some(EventType::ClusterUnhealthy);
    let healthy_again = Some(EventType::ClusterHealthy);
    assert_eq!(
        transitions,
        [
            unhealthy,
            healthy_again,
            unhealthy,
            healthy_again,
            unhealthy,
            healthy_again
        ]
    );
}

#[test]
fn a_restart_is_announced_and_ends_with_the_next_instance() {
    let p = policy();
    let r = on_heartbeat(None, &heartbeat(1, "old"), 0).unwrap();
    let mut last = heartbeat(2, "old");
    last.restart_grace_ms = 60_000;
    let leaving = on_heartbeat(Some(&r), &last, 1_000).unwrap();
    assert_eq!(pending_event(&leaving), Some(EventType::ClusterRestarting));
    assert_eq!(leaving.restart_expected_by_unix_ms, 61_000);
    assert!(
        leaving.last_transition_message.contains("back within 60 s"),
        "{}",
        leaving.last_transition_message
    );
    assert!(
        on_tick(&leaving, 30_000, 0, &p).is_none(),
        "within the grace"
    );
    let back = on_heartbeat(Some(&leaving), &heartbeat(1, "new"), 40_000).unwrap();
    assert_eq!(back.restart_expected_by_unix_ms, 0);
    assert_eq!(back.health(), ClusterHealth::Healthy);
    assert_eq!(back.generation, leaving.generation, "no news: it is back");
    let late = on_tick(&leaving, 61_001, 0, &p).unwrap();
    assert_eq!(late.health(), ClusterHealth::Unhealthy);
    assert!(
        late.health_reason.contains("announced restart"),
        "{}",
        late.health_reason
    );
}

#[test]
fn slow_answers_on_a_busy_hub_do_not_break_the_watch_but_a_pause_in_asking_does() {
    let p = policy();
    let mut watch = HubWatch::new(HubWatch::gap_for(&p));
    // Each round trip takes 1.2 s (more than the 1.5 s gap would allow
    // between answers with the check interval added) and is sent 250 ms
    // after the last answer.
    let mut answered = 0;
    for _ in 0..10 {
        let sent = answered + 250;
        answered = sent + 1_200;
        watch.observe(true, sent, answered);
    }
    assert_eq!(
        watch.watching_since(answered),
        Some(1_450),
        "one unbroken watch"
    );
    // The checker itself stalls for 2 s before asking again: a new watch.
    let sent = answered + 2_000;
    watch.observe(true, sent, sent + 10);
    assert_eq!(watch.watching_since(sent + 10), Some(sent + 10));
}

#[test]
fn a_cluster_heard_since_its_record_was_written_is_not_silent() {
    let p = policy();
    // Records last written at 1 s (their heartbeats since were coalesced);
    // "a" was heard at 4.5 s, "b" last at 1 s.
    let records = [healthy("a", S), healthy("b", S), healthy("c", 5 * S)];
    let heard = HashMap::from([("a".to_string(), 4_500), ("b".to_string(), S)]);
    let mut all = records.iter().map(|r| (r.name.as_str(), r));
    let judgement = judge(&mut all, &heard, Some(0), Some(0), 5 * S, &p);
    assert_eq!(judgement.due, vec!["b".to_string()]);
    assert_eq!(judgement.held, None);
}

/// A server of three lost: the heartbeat stream stalls for its leader
/// election while round trips still answer. Heartbeats were spread over
/// the interval, so at no moment were all clusters past the window
/// together; the pulse, not the mass-silence rule, keeps them healthy.
#[test]
fn a_stalled_heartbeat_stream_is_the_hubs_gap_and_no_cluster_is_blamed_for_it() {
    let p = policy();
    let mut pulse = HubWatch::new(HubWatch::gap_for(&p));
    // Four clusters heard every 500 ms, spread, until 10 s; the stream
    // stalls 10 s to 14 s; from then on only "a" and "b" are heard again
    // before the check ("c" and "d" are on their way); "d" died at 10 s.
    let mut last = HashMap::new();
    for at in (0..10 * S).step_by(125) {
        let name = ["a", "b", "c", "d"][(at / 125 % 4) as usize];
        pulse.observe(true, at, at);
        last.insert(name.to_string(), at);
    }
    assert_eq!(pulse.watching_since(13 * S), None, "the stall broke it");
    for (name, at) in [("a", 14 * S), ("b", 14_100)] {
        pulse.observe(true, at, at);
        last.insert(name.to_string(), at);
    }
    let records: Vec<ClusterRecord> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| healthy(n, last[*n]))
        .collect();
    let check = |heard: &HashMap<String, i64>, now: i64, pulse_since: Option<i64>| {
        let mut all = records.iter().map(|r| (r.name.as_str(), r));
        judge(&mut all, heard, Some(0), pulse_since, now, &p)
    };

    // During the stall: nobody heard for 2 s, which breaks the pulse.
    let during = check(&last, 13 * S, None);
    assert_eq!(during.due, Vec::<String>::new());
    assert_eq!(during.held, Some(Hold::NoPulse { clusters: 4 }));

    // Just after it: "c" and "d" were silent 4 s by the wall clock, but
    // the pulse started again at 14 s, so neither is due yet.
    let since = pulse.watching_since(14_200);
    assert_eq!(since, Some(14 * S));
    let after = check(&last, 14_200, since);
    assert_eq!(after.due, Vec::<String>::new());
    assert_eq!(after.held, None);
    assert_eq!(after.since_ms, Some(14 * S));

    // A full window after the pulse resumed, the one still silent is due.
    let mut pulse_later = pulse;
    let mut heard_later = last.clone();
    for (i, at) in (14_200..17_200).step_by(250).enumerate() {
        pulse_later.observe(true, at, at);
        heard_later.insert(["a", "b"][i % 2].to_string(), at);
    }
    let later = check(&heard_later, 17_200, pulse_later.watching_since(17_200));
    assert_eq!(later.due, vec!["c".to_string(), "d".to_string()]);

    // A fleet of one has no pulse but its own: its silence is judged by
    // the round trips alone.
    let one = [healthy("only", 10 * S)];
    let mut all = one.iter().map(|r| (r.name.as_str(), r));
    let alone = judge(&mut all, &HashMap::new(), Some(0), None, 14 * S, &p);
    assert_eq!(alone.due, vec!["only".to_string()]);
}

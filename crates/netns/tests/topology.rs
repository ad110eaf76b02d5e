//! A real two-member topology on this host: what each side reaches, a cut
//! and a heal, and nothing left behind. Needs root (as CI runs); without
//! it each test says so and passes without checking anything.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use flotilla_netns::{Member, NetnsError, Topology, TopologySpec, preflight};

/// How long a connection that should work may take; one that should not is
/// given as long before it counts as failed.
const CONNECT: Duration = Duration::from_secs(2);

/// Whether this machine can run the tests; says why not when it cannot.
/// The tests of this file one at a time: each topology's creation removes
/// the leftovers it finds, among them the one a test makes on purpose.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn permitted() -> bool {
    match preflight() {
        Ok(_) => true,
        Err(e @ (NetnsError::NotPermitted { .. } | NetnsError::NoIpCommand)) => {
            eprintln!("SKIPPED: {e}");
            false
        }
        Err(e) => panic!("{e}"),
    }
}

fn connects(to: SocketAddr) -> bool {
    TcpStream::connect_timeout(&to, CONNECT).is_ok()
}

/// A listener on `address` inside `member`, on a free port.
fn listen_in(member: &Member, address: Ipv4Addr) -> (TcpListener, SocketAddr) {
    let listener = member
        .within(|| TcpListener::bind((address, 0)))
        .unwrap()
        .unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

fn namespaces() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn device_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", name])
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn members_are_separate_networks_joined_to_the_hub() {
    let _serial = serial();
    if !permitted() {
        return;
    }
    let topology = Topology::create(&TopologySpec::new(["a", "b"])).unwrap();
    let a = topology.member("a").unwrap();
    let b = topology.member("b").unwrap();
    assert_ne!(a.namespace(), b.namespace());
    assert_ne!(a.pod_address(), b.pod_address());

    // A member reaches the hub at the hub side of its link.
    let hub = TcpListener::bind((a.hub_address(), 0)).unwrap();
    let hub_addr = hub.local_addr().unwrap();
    assert!(a.within(|| connects(hub_addr)).unwrap(), "a → hub");

    // The hub reaches a member's link address, not its pod address; the
    // member reaches its own pod address.
    let (_edge, edge) = listen_in(a, a.link_address());
    assert!(connects(edge), "hub → a's link address");
    let (_pod, pod_a) = listen_in(a, a.pod_address());
    assert!(!connects(pod_a), "the hub reached a's pod address {pod_a}");
    assert!(a.within(|| connects(pod_a)).unwrap(), "a → its own pod");

    // One member does not reach another's pod address.
    let (_pod_b_listener, pod_b) = listen_in(b, b.pod_address());
    assert!(
        !a.within(|| connects(pod_b)).unwrap(),
        "a reached b's pod address {pod_b}"
    );

    // A program run in the member sees the member's addresses.
    let out = a
        .command("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .unwrap();
    let addrs = String::from_utf8_lossy(&out.stdout);
    assert!(addrs.contains(&a.pod_address().to_string()), "{addrs}");
    assert!(addrs.contains(&a.link_address().to_string()), "{addrs}");
    assert!(!addrs.contains(&b.link_address().to_string()), "{addrs}");

    // A cut takes only that member off; a heal brings it back.
    let (_edge_b, edge_b) = listen_in(b, b.link_address());
    topology.cut("a").unwrap();
    assert!(!connects(edge), "the hub reached a across a cut");
    assert!(
        !a.within(|| connects(hub_addr)).unwrap(),
        "a reached the hub across a cut"
    );
    assert!(connects(edge_b), "b was cut with a");
    topology.heal("a").unwrap();
    assert!(connects(edge), "hub → a after the heal");
    assert!(
        a.within(|| connects(hub_addr)).unwrap(),
        "a → hub after the heal"
    );

    assert!(matches!(
        topology.member("c"),
        Err(NetnsError::UnknownMember(_))
    ));
}

#[test]
fn dropping_the_topology_kills_its_processes_and_removes_its_namespaces() {
    let _serial = serial();
    if !permitted() {
        return;
    }
    let topology = Topology::create(&TopologySpec::new(["a"])).unwrap();
    let member = topology.member("a").unwrap().clone();
    let mut sleeper = member.command("sleep").arg("600").spawn().unwrap();
    let pid = sleeper.id();
    let until = Instant::now() + Duration::from_secs(5);
    while !member.pids().unwrap().contains(&pid) {
        assert!(
            Instant::now() < until,
            "sleep {pid} not seen in the namespace"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(namespaces().contains(member.namespace()));

    drop(topology);

    // Killed: its parent (this test) reaps it.
    let status = sleeper.wait().unwrap();
    assert!(!status.success());
    assert!(!namespaces().contains(member.namespace()));
    assert!(!device_exists(&member.hub_device()));
}

#[test]
fn a_namespace_in_use_is_refused() {
    let _serial = serial();
    if !permitted() {
        return;
    }
    let prefix = format!("fltest{}", std::process::id());
    let first = Topology::create(&TopologySpec::new(["a"]).namespace_prefix(&prefix)).unwrap();
    let again = Topology::create(&TopologySpec::new(["b", "a"]).namespace_prefix(&prefix));
    match again {
        Err(NetnsError::NamespaceExists(ns)) => assert_eq!(ns, format!("{prefix}-a")),
        other => panic!("expected NamespaceExists, got {other:?}"),
    }
    // The refused topology removed the member it had made, not the first's.
    assert!(!namespaces().contains(&format!("{prefix}-b")));
    assert!(namespaces().contains(&format!("{prefix}-a")));
    first.remove().unwrap();
    assert!(!namespaces().contains(&format!("{prefix}-a")));
}

#[test]
fn leftovers_of_a_process_that_is_gone_are_removed() {
    let _serial = serial();
    if !permitted() {
        return;
    }
    let ip = preflight().unwrap();
    let topology = Topology::create(&TopologySpec::new(["a"])).unwrap();
    let member = topology.member("a").unwrap().clone();
    // As if the creator had been killed: its process is gone, its topology
    // never dropped.
    std::mem::forget(topology);
    let mut gone = Command::new("true").spawn().unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();
    let alias = format!(
        "flotilla-netns pid={gone_pid} start=1 ns={}",
        member.namespace()
    );
    let set = Command::new(&ip)
        .args(["link", "set", &member.hub_device(), "alias", &alias])
        .status()
        .unwrap();
    assert!(set.success());

    let removed = flotilla_netns::remove_leftovers(&ip).unwrap();
    assert!(
        removed.iter().any(|ns| ns == member.namespace()),
        "{removed:?}"
    );
    assert!(!namespaces().contains(member.namespace()));
    assert!(!device_exists(&member.hub_device()));
}

#[test]
fn a_spec_is_checked_before_anything_is_made() {
    for (spec, wanted) in [
        (TopologySpec::new(Vec::<String>::new()), "needs a member"),
        (TopologySpec::new(["a", "a"]), "named twice"),
        (TopologySpec::new(["Eu_West"]), "lowercase"),
        (TopologySpec::new(["a"]).namespace_prefix("x y"), "prefix"),
    ] {
        match Topology::create(&spec) {
            Err(NetnsError::InvalidSpec(why)) => assert!(why.contains(wanted), "{why}"),
            other => panic!("{spec:?}: expected InvalidSpec, got {other:?}"),
        }
    }
}

//! Member clusters as separate networks on one Linux host.
//!
//! A [`Topology`] has a *hub*, the host's own network namespace, and
//! members, each a network namespace of its own joined to the hub by one
//! veth link. In a member, processes see:
//!
//! - the member side of its link ([`Member::link_address`]), reachable from
//!   the hub: what a cluster exposes (its edge);
//! - a pod address ([`Member::pod_address`]) on the namespace's own `lo`,
//!   for which the hub has no route, like a pod IP: what a cluster keeps to
//!   itself (its replicas);
//! - a default route to the hub side of the link ([`Member::hub_address`]),
//!   where the hub's services listen for members.
//!
//! [`Topology::cut`] and [`Topology::heal`] take a member's link down and up
//! (a WAN cut, without netem or a firewall). Dropping the topology kills the
//! processes left in its namespaces and removes them, also when a test
//! panics; [`Topology::create`] first removes what a topology of a process
//! that no longer runs left behind (it was killed before its drop).
//!
//! Invariants: addresses are only ever added to links this crate creates
//! (see [`plan`] for the ranges); no state beyond the namespaces and links
//! themselves (the owner of a link is written in its hub device's alias).
//!
//! Start reading at [`Topology::create`]. It needs root (CAP_NET_ADMIN and
//! CAP_SYS_ADMIN) and the `ip` command of iproute2; [`preflight`] says which
//! is missing.

pub mod plan;

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use plan::{MEMBER_DEVICE, Owner, Slot};

/// How long the processes of a namespace may take to exit after SIGKILL.
const KILL_DEADLINE: Duration = Duration::from_secs(5);

/// What went wrong, in the words of the person running it.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error(
        "network namespaces need root or CAP_NET_ADMIN and CAP_SYS_ADMIN (this process has {has}); run as root"
    )]
    NotPermitted { has: String },
    #[error(
        "the `ip` command (iproute2) is not installed (looked in PATH, /usr/sbin, /sbin, /usr/bin, /bin); install iproute2"
    )]
    NoIpCommand,
    #[error("{0}")]
    InvalidSpec(String),
    #[error(
        "network namespace {0} already exists; another fleet uses it, or remove a leftover with `ip netns delete {0}`"
    )]
    NamespaceExists(String),
    #[error("no free link slot: all {} are taken on this host", plan::SLOTS)]
    NoFreeSlot,
    #[error("no member named {0:?} in this topology")]
    UnknownMember(String),
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("running `ip {args}`: {source}")]
    IpSpawn {
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("entering network namespace {namespace}: {source}")]
    Enter {
        namespace: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the thread running in namespace {0} panicked")]
    EnteredThreadPanicked(String),
    #[error("processes {pids:?} in namespace {namespace} did not exit after SIGKILL")]
    Lingering { namespace: String, pids: Vec<u32> },
}

/// What to create: the member names, and how namespaces are named.
#[derive(Debug, Clone)]
pub struct TopologySpec {
    members: Vec<String>,
    prefix: Option<String>,
}

impl TopologySpec {
    /// Members named `members` (cluster names: lowercase letters, digits,
    /// `-`), in namespaces named `<fleet id>-<member>`, a fleet id unique on
    /// the host.
    pub fn new<I, S>(members: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            members: members.into_iter().map(Into::into).collect(),
            prefix: None,
        }
    }

    /// Names the namespaces `<prefix>-<member>` instead (`flotilla` gives
    /// `flotilla-eu-west`): names a person types, for a fleet of which one
    /// runs at a time. Creating fails when one of them exists.
    pub fn namespace_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    fn check(&self) -> Result<(), NetnsError> {
        if self.members.is_empty() {
            return Err(NetnsError::InvalidSpec("a topology needs a member".into()));
        }
        for (i, name) in self.members.iter().enumerate() {
            plan::check_member_name(name).map_err(NetnsError::InvalidSpec)?;
            if self.members[..i].contains(name) {
                return Err(NetnsError::InvalidSpec(format!(
                    "member {name:?} is named twice"
                )));
            }
        }
        if let Some(prefix) = &self.prefix {
            plan::check_member_name(prefix).map_err(|_| {
                NetnsError::InvalidSpec(format!(
                    "namespace prefix {prefix:?} must be lowercase letters, digits and '-'"
                ))
            })?;
        }
        Ok(())
    }
}

/// One member: its namespace and addresses.
#[derive(Debug, Clone)]
pub struct Member {
    name: String,
    namespace: String,
    slot: Slot,
    ip: PathBuf,
}

impl Member {
    /// The member's name, as given in the spec.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its network namespace (`ip netns exec NAMESPACE ...`).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The hub side of its link: where it reaches the hub.
    pub fn hub_address(&self) -> Ipv4Addr {
        self.slot.hub_address()
    }

    /// The member side of its link: where the hub reaches it.
    pub fn link_address(&self) -> Ipv4Addr {
        self.slot.link_address()
    }

    /// Its pod address, on its own `lo`: nothing outside the member reaches
    /// it.
    pub fn pod_address(&self) -> Ipv4Addr {
        self.slot.pod_address()
    }

    /// The name of the hub side of its link, in the host's namespace.
    pub fn hub_device(&self) -> String {
        self.slot.hub_device()
    }

    /// `program` run inside this member's namespace, through
    /// `ip netns exec` (which execs it: the child's process id is the
    /// program's). Arguments, environment and standard streams are the
    /// caller's to add.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new(&self.ip);
        command
            .args(["netns", "exec"])
            .arg(&self.namespace)
            .arg(program);
        command
    }

    /// [`command`](Self::command) for tokio.
    pub fn tokio_command(&self, program: impl AsRef<OsStr>) -> tokio::process::Command {
        tokio::process::Command::from(self.command(program))
    }

    /// Runs `work` on a thread of this process that has entered this
    /// member's namespace: sockets it opens (a listener, a connection) are
    /// the member's and stay so after it returns. For tests that act as a
    /// process of the member without starting one.
    pub fn within<T, F>(&self, work: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let entered = |source| NetnsError::Enter {
            namespace: self.namespace.clone(),
            source,
        };
        let handle =
            std::fs::File::open(Path::new("/run/netns").join(&self.namespace)).map_err(entered)?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // Only this thread moves; it ends with `work`.
                    rustix::thread::move_into_link_name_space(
                        std::os::fd::AsFd::as_fd(&handle),
                        Some(rustix::thread::LinkNameSpaceType::Network),
                    )
                    .map_err(|e| entered(e.into()))?;
                    Ok(work())
                })
                .join()
                .map_err(|_| NetnsError::EnteredThreadPanicked(self.namespace.clone()))?
        })
    }

    /// The processes running in this member's namespace.
    pub fn pids(&self) -> Result<Vec<u32>, NetnsError> {
        let out = run_ip(&self.ip, &["netns", "pids", &self.namespace])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect())
    }
}

/// The hub and its members; dropping it removes the members.
#[derive(Debug)]
pub struct Topology {
    id: String,
    members: Vec<Member>,
    ip: PathBuf,
    removed: bool,
}

impl Topology {
    /// Creates a namespace and a link for each member of `spec`, after
    /// removing the leftovers of topologies whose process is gone. On an
    /// error, what was created is removed again.
    pub fn create(spec: &TopologySpec) -> Result<Self, NetnsError> {
        spec.check()?;
        let ip = preflight()?;
        if let Err(e) = remove_leftovers(&ip) {
            tracing::warn!("could not remove leftover namespaces: {e}");
        }
        let pid = std::process::id();
        let nonce = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(pid);
            h.finish()
        };
        let id = plan::fleet_id(pid, nonce as u32);
        let prefix = spec.prefix.clone().unwrap_or_else(|| format!("fl{id}"));
        let owner_start = own_start_time();
        let mut topology = Self {
            id,
            members: Vec::new(),
            ip: ip.clone(),
            removed: false,
        };
        let used = host_addresses(&ip)?;
        let mut slots = plan::slots_from(nonce);
        for name in &spec.members {
            let namespace = plan::namespace_name(&prefix, name);
            let owner = Owner {
                pid,
                start_time: owner_start,
                namespace: namespace.clone(),
            };
            // Dropping `topology` on an error removes the members made so
            // far.
            let slot = add_member(&ip, &owner, &mut slots, &used)?;
            topology.members.push(Member {
                name: name.clone(),
                namespace,
                slot,
                ip: ip.clone(),
            });
        }
        tracing::info!(
            id = %topology.id,
            members = ?topology.members.iter().map(|m| (m.namespace.as_str(), m.link_address())).collect::<Vec<_>>(),
            "network namespaces created"
        );
        Ok(topology)
    }

    /// The id that makes this topology's names unique on the host.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The member named `name`.
    pub fn member(&self, name: &str) -> Result<&Member, NetnsError> {
        self.members
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| NetnsError::UnknownMember(name.into()))
    }

    /// `program` inside member `name`'s namespace ([`Member::command`]).
    pub fn command(&self, name: &str, program: impl AsRef<OsStr>) -> Result<Command, NetnsError> {
        Ok(self.member(name)?.command(program))
    }

    /// [`command`](Self::command) for tokio.
    pub fn tokio_command(
        &self,
        name: &str,
        program: impl AsRef<OsStr>,
    ) -> Result<tokio::process::Command, NetnsError> {
        Ok(self.member(name)?.tokio_command(program))
    }

    /// Cuts member `name` off: the hub side of its link goes down, so
    /// nothing passes either way and open connections hang as over a cut
    /// WAN (no reset). The member keeps running, with its own addresses.
    pub fn cut(&self, name: &str) -> Result<(), NetnsError> {
        let member = self.member(name)?;
        run_ip(&self.ip, &["link", "set", &member.hub_device(), "down"])?;
        tracing::info!(member = name, "link cut");
        Ok(())
    }

    /// Joins member `name` to the hub again after [`cut`](Self::cut).
    pub fn heal(&self, name: &str) -> Result<(), NetnsError> {
        let member = self.member(name)?;
        run_ip(&self.ip, &["link", "set", &member.hub_device(), "up"])?;
        // The member side stayed up, so its default route is normally
        // still there; put it back in case something removed it.
        let hub = member.hub_address().to_string();
        run_ip(
            &self.ip,
            &[
                "-n",
                &member.namespace,
                "route",
                "replace",
                "default",
                "via",
                &hub,
                "dev",
                MEMBER_DEVICE,
            ],
        )?;
        tracing::info!(member = name, "link healed");
        Ok(())
    }

    /// Kills every process left in the members' namespaces and removes
    /// them; what dropping the topology does, with the errors.
    pub fn remove(mut self) -> Result<(), NetnsError> {
        self.remove_all()
    }

    fn remove_all(&mut self) -> Result<(), NetnsError> {
        if self.removed {
            return Ok(());
        }
        self.removed = true;
        let mut first_error = None;
        for member in self.members.drain(..).rev() {
            if let Err(e) = remove_member(&self.ip, &member.namespace, member.slot) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Err(e) = self.remove_all() {
            tracing::warn!("removing network namespaces: {e}");
            eprintln!("flotilla-netns: removing network namespaces: {e}");
        }
    }
}

/// The `ip` command, when this process may create namespaces with it;
/// otherwise what is missing.
pub fn preflight() -> Result<PathBuf, NetnsError> {
    let ip = find_ip().ok_or(NetnsError::NoIpCommand)?;
    let (net_admin, sys_admin) = capabilities();
    if !(net_admin && sys_admin) {
        let has = match (net_admin, sys_admin) {
            (true, false) => "CAP_NET_ADMIN only",
            (false, true) => "CAP_SYS_ADMIN only",
            _ => "neither",
        };
        return Err(NetnsError::NotPermitted { has: has.into() });
    }
    Ok(ip)
}

fn find_ip() -> Option<PathBuf> {
    let from_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    from_path
        .into_iter()
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join("ip"))
        .find(|candidate| candidate.is_file())
}

/// Whether this process holds CAP_NET_ADMIN (links, addresses) and
/// CAP_SYS_ADMIN (`ip netns add` mounts the namespace), from its effective
/// set.
fn capabilities() -> (bool, bool) {
    const NET_ADMIN: u32 = 12;
    const SYS_ADMIN: u32 = 21;
    let effective = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0);
    let has = |bit: u32| effective & (1 << bit) != 0;
    (has(NET_ADMIN), has(SYS_ADMIN))
}

fn run_ip(ip: &Path, args: &[&str]) -> Result<Output, NetnsError> {
    let out = Command::new(ip)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetnsError::IpSpawn {
            args: args.join(" "),
            source,
        })?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(NetnsError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn already_exists(e: &NetnsError) -> bool {
    matches!(e, NetnsError::Ip { stderr, .. } if stderr.contains("File exists") || stderr.contains("already exists"))
}

/// The IPv4 addresses on this host's own interfaces: a slot that would
/// reuse one of them is skipped.
fn host_addresses(ip: &Path) -> Result<Vec<Ipv4Addr>, NetnsError> {
    let out = run_ip(ip, &["-4", "-o", "addr", "show"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .collect())
}

/// Creates one member's namespace, claims a slot for its link and sets up
/// both sides; removes what it made when a step fails.
fn add_member(
    ip: &Path,
    owner: &Owner,
    slots: &mut impl Iterator<Item = Slot>,
    used: &[Ipv4Addr],
) -> Result<Slot, NetnsError> {
    let ns = owner.namespace.as_str();
    if let Err(e) = run_ip(ip, &["netns", "add", ns]) {
        return Err(if already_exists(&e) {
            NetnsError::NamespaceExists(ns.into())
        } else {
            e
        });
    }
    let slot = loop {
        let Some(slot) = slots.next() else {
            let _ = run_ip(ip, &["netns", "delete", ns]);
            return Err(NetnsError::NoFreeSlot);
        };
        if used.iter().any(|a| slot.overlaps(*a)) {
            continue;
        }
        let device = slot.hub_device();
        // Creating the hub device claims the slot: the name is unique on
        // the host.
        match run_ip(
            ip,
            &[
                "link",
                "add",
                &device,
                "type",
                "veth",
                "peer",
                "name",
                MEMBER_DEVICE,
                "netns",
                ns,
            ],
        ) {
            Ok(_) => break slot,
            Err(e) if already_exists(&e) => continue,
            Err(e) => {
                let _ = run_ip(ip, &["netns", "delete", ns]);
                return Err(e);
            }
        }
    };
    let configured = configure_link(ip, owner, slot);
    if let Err(e) = configured {
        let _ = remove_member(ip, ns, slot);
        return Err(e);
    }
    Ok(slot)
}

fn configure_link(ip: &Path, owner: &Owner, slot: Slot) -> Result<(), NetnsError> {
    let ns = owner.namespace.as_str();
    let device = slot.hub_device();
    let prefix = plan::LINK_PREFIX;
    let hub = format!("{}/{prefix}", slot.hub_address());
    let link = format!("{}/{prefix}", slot.link_address());
    let pod = format!("{}/32", slot.pod_address());
    let hub_address = slot.hub_address().to_string();
    let alias = owner.alias();
    let steps: [&[&str]; 9] = [
        &["link", "set", &device, "alias", &alias],
        &["addr", "add", &hub, "dev", &device],
        &["link", "set", &device, "up"],
        &["-n", ns, "link", "set", "lo", "up"],
        &["-n", ns, "addr", "add", &pod, "dev", "lo"],
        &["-n", ns, "addr", "add", &link, "dev", MEMBER_DEVICE],
        &["-n", ns, "link", "set", MEMBER_DEVICE, "up"],
        &[
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &hub_address,
            "dev",
            MEMBER_DEVICE,
        ],
        // Nothing to wait for: a veth's carrier is up as soon as both ends
        // are, and the addresses are usable at once (no DAD for IPv4).
        &["-n", ns, "link", "show", MEMBER_DEVICE],
    ];
    for step in steps {
        run_ip(ip, step)?;
    }
    Ok(())
}

/// Kills what runs in `namespace`, deletes the hub side of its link (and
/// with it the member side) and the namespace.
fn remove_member(ip: &Path, namespace: &str, slot: Slot) -> Result<(), NetnsError> {
    let pids = |ns: &str| -> Vec<u32> {
        run_ip(ip, &["netns", "pids", ns])
            .map(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut left = pids(namespace);
    let deadline = Instant::now() + KILL_DEADLINE;
    while !left.is_empty() {
        for pid in &left {
            if let Some(pid) = rustix::process::Pid::from_raw(*pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        // Exit after SIGKILL announces nothing to a non-parent; look again
        // shortly.
        std::thread::sleep(Duration::from_millis(20));
        left = pids(namespace);
    }
    let _ = run_ip(ip, &["link", "delete", &slot.hub_device()]);
    let deleted = match run_ip(ip, &["netns", "delete", namespace]) {
        // Another process removing the same leftovers got there first.
        Err(_) if !Path::new("/run/netns").join(namespace).exists() => Ok(()),
        other => other.map(|_| ()),
    };
    if !left.is_empty() {
        return Err(NetnsError::Lingering {
            namespace: namespace.into(),
            pids: left,
        });
    }
    deleted
}

/// This process's start time, as [`Owner`] records it.
fn own_start_time() -> u64 {
    start_time_of(std::process::id()).unwrap_or(0)
}

fn start_time_of(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    plan::start_time_of_stat(&stat)
}

/// Removes the namespaces and links of topologies whose process no longer
/// runs (killed before it could drop them); the namespaces removed.
pub fn remove_leftovers(ip: &Path) -> Result<Vec<String>, NetnsError> {
    let out = run_ip(ip, &["-o", "link", "show"])?;
    let mut removed = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // `N: flh12@if3: <...> ... \    alias flotilla-netns pid=...`
        let Some(device) = line
            .split(": ")
            .nth(1)
            .map(|d| d.split('@').next().unwrap_or(d))
        else {
            continue;
        };
        let Some(slot) = Slot::of_hub_device(device) else {
            continue;
        };
        let alias = line
            .split("alias ")
            .nth(1)
            .map(|a| a.split('\\').next().unwrap_or(a));
        let Some(owner) = alias.and_then(Owner::parse) else {
            continue;
        };
        if start_time_of(owner.pid) == Some(owner.start_time) {
            continue;
        }
        remove_member(ip, &owner.namespace, slot)?;
        tracing::info!(namespace = %owner.namespace, "removed a leftover network namespace");
        removed.push(owner.namespace);
    }
    Ok(removed)
}

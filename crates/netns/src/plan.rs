//! The address plan and the names of a topology: pure functions of a slot
//! number and a fleet id, so that they are checked without a network.
//!
//! A *slot* is one member's share of two private ranges:
//!
//! - its link, a /30 in `10.213.0.0/16`: the hub side takes `.1`, the
//!   member side `.2` of the block;
//! - its pod address, the same offset in `10.214.0.0/16` as a /32, which
//!   exists only on the member namespace's own `lo`.
//!
//! 16,384 slots fit. A slot is claimed by creating the hub side of its link,
//! `flh<slot>`: device names are unique on a host, so two fleets starting at
//! the same time cannot both take one.

use std::net::Ipv4Addr;

/// The first two octets of the link ranges (`10.213.0.0/16`).
pub const LINK_RANGE: [u8; 2] = [10, 213];
/// The first two octets of the pod addresses (`10.214.0.0/16`).
pub const POD_RANGE: [u8; 2] = [10, 214];
/// How many members the ranges hold, on one host, over every fleet.
pub const SLOTS: u16 = 16_384;
/// The prefix length of a link.
pub const LINK_PREFIX: u8 = 30;
/// The name of the hub side of a link is this, then the slot number.
pub const HUB_DEVICE_PREFIX: &str = "flh";
/// The name of the member side of its link, inside its namespace.
pub const MEMBER_DEVICE: &str = "uplink";
/// The longest member name: namespace and process names stay readable.
pub const MAX_MEMBER_NAME: usize = 32;

/// One member's place in the ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot(u16);

impl Slot {
    /// The slot numbered `n`, when it is below [`SLOTS`].
    pub fn new(n: u16) -> Option<Self> {
        (n < SLOTS).then_some(Self(n))
    }

    pub fn number(self) -> u16 {
        self.0
    }

    /// The third and fourth octets of the block's first address.
    fn block(self) -> (u8, u8) {
        // n < 16384: n / 64 < 256 and (n % 64) * 4 + 3 < 256.
        ((self.0 / 64) as u8, ((self.0 % 64) * 4) as u8)
    }

    /// The hub side of the link.
    pub fn hub_address(self) -> Ipv4Addr {
        let (c, d) = self.block();
        Ipv4Addr::new(LINK_RANGE[0], LINK_RANGE[1], c, d + 1)
    }

    /// The member side of the link.
    pub fn link_address(self) -> Ipv4Addr {
        let (c, d) = self.block();
        Ipv4Addr::new(LINK_RANGE[0], LINK_RANGE[1], c, d + 2)
    }

    /// The member's pod address, a /32 on its own `lo`.
    pub fn pod_address(self) -> Ipv4Addr {
        let (c, d) = self.block();
        Ipv4Addr::new(POD_RANGE[0], POD_RANGE[1], c, d + 1)
    }

    /// Whether `address` falls in this slot's link block or is its pod
    /// address: a host that already uses one of them cannot have the slot.
    pub fn overlaps(self, address: Ipv4Addr) -> bool {
        let (c, d) = self.block();
        let [a0, a1, a2, a3] = address.octets();
        let in_link = [a0, a1] == LINK_RANGE && a2 == c && a3 & !3 == d;
        in_link || address == self.pod_address()
    }

    /// The name of the hub side of the link, which claims the slot.
    pub fn hub_device(self) -> String {
        format!("{HUB_DEVICE_PREFIX}{}", self.0)
    }

    /// The slot of a hub device name (`flh12` → 12); `None` for any other
    /// device.
    pub fn of_hub_device(name: &str) -> Option<Self> {
        let digits = name.strip_prefix(HUB_DEVICE_PREFIX)?;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Self::new(digits.parse().ok()?)
    }
}

/// Every slot once, starting at the one `seed` picks: fleets with different
/// seeds look in different places first, and rarely race for one.
pub fn slots_from(seed: u64) -> impl Iterator<Item = Slot> {
    let start = (seed % u64::from(SLOTS)) as u16;
    (0..SLOTS).map(move |i| Slot((start + i) % SLOTS))
}

/// Whether `name` can name a member: lowercase letters, digits and `-`, not
/// starting or ending with `-`, at most [`MAX_MEMBER_NAME`] characters (a
/// cluster name of the fleet fits).
pub fn check_member_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a member name is empty".into());
    }
    if name.len() > MAX_MEMBER_NAME {
        return Err(format!(
            "member name {name:?} is longer than {MAX_MEMBER_NAME} characters"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        || name.starts_with('-')
        || name.ends_with('-')
    {
        return Err(format!(
            "member name {name:?} must be lowercase letters, digits and '-' (not first or last)"
        ));
    }
    Ok(())
}

/// A namespace name: `prefix-member`.
pub fn namespace_name(prefix: &str, member: &str) -> String {
    format!("{prefix}-{member}")
}

/// A short id for one topology: the owner's process id and a nonce, in
/// base 36, so two topologies of one process, or of two processes, differ.
pub fn fleet_id(pid: u32, nonce: u32) -> String {
    format!(
        "{}{}",
        base36(u64::from(pid)),
        base36(u64::from(nonce % 1296))
    )
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

/// Who created a link, written in the hub device's alias so that a later
/// topology can tell a leftover of a process that is gone from a link in
/// use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    /// The owner's start time (field 22 of `/proc/PID/stat`): a process id
    /// reused by another process is not the owner.
    pub start_time: u64,
    pub namespace: String,
}

impl Owner {
    /// The alias text.
    pub fn alias(&self) -> String {
        format!(
            "flotilla-netns pid={} start={} ns={}",
            self.pid, self.start_time, self.namespace
        )
    }

    /// An alias written by [`alias`](Self::alias); `None` for any other.
    pub fn parse(alias: &str) -> Option<Self> {
        let mut fields = alias.trim().split(' ');
        if fields.next()? != "flotilla-netns" {
            return None;
        }
        let pid = fields.next()?.strip_prefix("pid=")?.parse().ok()?;
        let start_time = fields.next()?.strip_prefix("start=")?.parse().ok()?;
        let namespace = fields.next()?.strip_prefix("ns=")?.to_string();
        if namespace.is_empty() || fields.next().is_some() {
            return None;
        }
        Some(Self {
            pid,
            start_time,
            namespace,
        })
    }
}

/// The start time in a `/proc/PID/stat` line: field 22, counted after the
/// command name, which may itself hold spaces and parentheses.
pub fn start_time_of_stat(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // Fields 3.. follow the name; the start time is field 22.
    after_name.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_gives_a_link_block_and_a_pod_address() {
        let table = [
            (0, "10.213.0.1", "10.213.0.2", "10.214.0.1", "flh0"),
            (1, "10.213.0.5", "10.213.0.6", "10.214.0.5", "flh1"),
            (63, "10.213.0.253", "10.213.0.254", "10.214.0.253", "flh63"),
            (64, "10.213.1.1", "10.213.1.2", "10.214.1.1", "flh64"),
            (
                16_383,
                "10.213.255.253",
                "10.213.255.254",
                "10.214.255.253",
                "flh16383",
            ),
        ];
        for (n, hub, link, pod, device) in table {
            let slot = Slot::new(n).unwrap();
            assert_eq!(slot.hub_address().to_string(), hub, "slot {n}");
            assert_eq!(slot.link_address().to_string(), link, "slot {n}");
            assert_eq!(slot.pod_address().to_string(), pod, "slot {n}");
            assert_eq!(slot.hub_device(), device, "slot {n}");
            assert!(device.len() <= 15, "a device name fits IFNAMSIZ");
            assert_eq!(Slot::of_hub_device(device), Some(slot));
        }
        assert_eq!(Slot::new(SLOTS), None);
    }

    #[test]
    fn no_two_slots_share_an_address() {
        let mut seen = std::collections::HashSet::new();
        for slot in slots_from(0) {
            for a in [slot.hub_address(), slot.link_address(), slot.pod_address()] {
                assert!(seen.insert(a), "{a} given twice");
            }
        }
        assert_eq!(seen.len(), 3 * usize::from(SLOTS));
    }

    #[test]
    fn a_slot_overlaps_its_block_and_its_pod_address_only() {
        let slot = Slot::new(65).unwrap();
        for a in [
            "10.213.1.4",
            "10.213.1.5",
            "10.213.1.6",
            "10.213.1.7",
            "10.214.1.5",
        ] {
            assert!(slot.overlaps(a.parse().unwrap()), "{a}");
        }
        for a in [
            "10.213.1.8",
            "10.213.1.3",
            "10.214.1.6",
            "10.213.2.5",
            "127.0.0.1",
        ] {
            assert!(!slot.overlaps(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn only_hub_devices_name_a_slot() {
        for name in ["eth0", "flh", "flhx", "flh-1", "flh16384", "xflh1", "flh1a"] {
            assert_eq!(Slot::of_hub_device(name), None, "{name}");
        }
    }

    #[test]
    fn slots_are_tried_once_each_from_the_seed() {
        let tried: Vec<u16> = slots_from(u64::from(SLOTS) + 5).map(Slot::number).collect();
        assert_eq!(tried[0], 5);
        assert_eq!(tried[usize::from(SLOTS) - 5], 0);
        let mut sorted = tried.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), usize::from(SLOTS));
    }

    #[test]
    fn member_names() {
        for good in ["eu-west", "a", "c1", "ap-south-2"] {
            assert_eq!(check_member_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "EU",
            "eu_west",
            "-a",
            "a-",
            "eu west",
            "a/b",
            &"x".repeat(33),
        ] {
            assert!(check_member_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(namespace_name("fl3k9", "eu-west"), "fl3k9-eu-west");
    }

    #[test]
    fn fleet_ids_are_short_and_differ_by_owner_and_nonce() {
        assert_eq!(fleet_id(0, 0), "00");
        assert_eq!(fleet_id(36, 35), "10z");
        assert_ne!(fleet_id(4_194_304, 7), fleet_id(4_194_304, 8));
        assert!(fleet_id(u32::MAX, u32::MAX).len() <= 9);
    }

    #[test]
    fn an_owner_reads_back_from_its_alias() {
        let owner = Owner {
            pid: 4242,
            start_time: 987_654,
            namespace: "fl38i0-eu-west".into(),
        };
        assert_eq!(Owner::parse(&owner.alias()), Some(owner));
        for other in [
            "",
            "something else",
            "flotilla-netns pid=x start=1 ns=a",
            "flotilla-netns pid=1 start=1 ns=",
            "flotilla-netns pid=1 start=1 ns=a extra",
        ] {
            assert_eq!(Owner::parse(other), None, "{other:?}");
        }
    }

    #[test]
    fn the_start_time_is_field_22_whatever_the_command_name() {
        let stat = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(start_time_of_stat(stat), Some(987_654));
        assert_eq!(start_time_of_stat("garbage"), None);
    }
}

//! The plan: desired − observed as a list of changes in apply order. Pure.
//!
//! A plan is a value: printed for humans (`+`/`~`/`-` lines and a summary), serialised for
//! machines (`--output json`), compared in golden tests, and inverted ([`Plan::revert`]) to undo
//! an apply that fails half-way. Each change carries the state before and after, so the revert
//! needs nothing but the plan.

use crate::intent::state::{Address, Device, HostState, NatTable, Route, Rule, Sysctl};
use crate::model::config::Role;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Item {
    #[serde(rename = "link")]
    Device(Device),
    Address(Address),
    Route(Route),
    Sysctl(Sysctl),
    Nat(NatTable),
    Rule(Rule),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Add,
    Change,
    Remove,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub op: Op,
    pub before: Option<Item>,
    pub after: Option<Item>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub add: usize,
    pub change: usize,
    pub remove: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub host: String,
    pub role: Role,
    pub changes: Vec<Change>,
}

/// The host holds something under our name that we cannot safely take over.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    #[error("device {name} exists but was not created by appliance (its ifalias is not \"appliance\"); rename or delete it, appliance will not touch it")]
    ForeignLink { name: String },
    #[error("the nf_tables table `ip {}` exists but was not created by appliance (no appliance comment); rename or delete it, appliance will not touch it", crate::intent::state::NAT_TABLE)]
    ForeignNat,
    #[error("device {name} is a {found:?} device but the config needs a {want:?} device; delete it (`ip link del {name}`) and reconcile again")]
    WrongKind {
        name: String,
        found: crate::intent::state::DeviceKind,
        want: crate::intent::state::DeviceKind,
    },
}

impl Item {
    /// Where in the apply order this item goes for `op`: create devices before what sits on
    /// them, re-point routes before removing devices they used.
    fn phase(&self, op: Op) -> u8 {
        match (self, op) {
            (Item::Device(_), Op::Add | Op::Change) => 0,
            (Item::Sysctl(_), _) => 1,
            (Item::Address(_), Op::Add | Op::Change) => 2,
            (Item::Route(_), Op::Add | Op::Change) => 3,
            (Item::Route(_), Op::Remove) => 4,
            (Item::Nat(_), _) => 3,
            // After the routes of the tables they look up; before those routes go.
            (Item::Rule(_), Op::Add | Op::Change) => 3,
            (Item::Rule(_), Op::Remove) => 4,
            (Item::Address(_), Op::Remove) => 5,
            (Item::Device(_), Op::Remove) => 6,
        }
    }

    fn describe(&self) -> String {
        match self {
            Item::Device(l) => format!("link {} ({}, mtu {})", l.name, kind_name(l), l.mtu),
            Item::Address(a) => format!("address {} on {}", a.addr, a.dev),
            Item::Route(r) => format!("route {} {}", r.dst, route_target(r)),
            Item::Sysctl(s) => format!("sysctl {} = {}", s.key, s.value),
            Item::Nat(t) => format!(
                "nat table ip {} ({})",
                crate::intent::state::NAT_TABLE,
                nat_rules(t)
            ),
            Item::Rule(r) => format!(
                "rule priority {} udp dport {} lookup {}",
                r.priority, r.dport, r.table
            ),
        }
    }
}

fn kind_name(l: &Device) -> &'static str {
    match l.kind {
        crate::intent::state::DeviceKind::Tun => "tun",
        crate::intent::state::DeviceKind::Other => "other",
    }
}

fn route_target(r: &Route) -> String {
    let mut s = if let Some(gw) = r.gateway {
        format!("via {gw}")
    } else if r.blackhole {
        format!("blackhole metric {}", r.metric)
    } else if r.metric == crate::intent::state::TUNNEL_METRIC {
        format!("via {}", r.via.join(","))
    } else {
        format!("via {} metric {}", r.via.join(","), r.metric)
    };
    if let Some(src) = r.src {
        s.push_str(&format!(" src {src}"));
    }
    if r.table != crate::intent::state::MAIN_TABLE {
        s.push_str(&format!(" table {}", r.table));
    }
    s
}

impl Change {
    fn item(&self) -> &Item {
        self.after
            .as_ref()
            .or(self.before.as_ref())
            .expect("a change has a side")
    }

    /// One line: `+ …`, `~ …`, `- …`.
    pub fn line(&self) -> String {
        match (self.op, &self.before, &self.after) {
            (Op::Add, _, Some(a)) => format!("+ {}", a.describe()),
            (Op::Remove, Some(b), _) => format!("- {}", b.describe()),
            (Op::Change, Some(Item::Device(b)), Some(Item::Device(a))) => {
                let mut what = Vec::new();
                if b.mtu != a.mtu {
                    what.push(format!("mtu {} -> {}", b.mtu, a.mtu));
                }
                if b.up != a.up {
                    what.push(format!("{} -> {}", updown(b.up), updown(a.up)));
                }
                format!("~ link {}: {}", a.name, what.join(", "))
            }
            (Op::Change, Some(Item::Route(b)), Some(Item::Route(a))) => {
                format!(
                    "~ route {} {} -> {}",
                    a.dst,
                    route_target(b),
                    route_target(a)
                )
            }
            (Op::Change, Some(Item::Sysctl(b)), Some(Item::Sysctl(a))) => {
                format!("~ sysctl {} {} -> {}", a.key, b.value, a.value)
            }
            (Op::Change, Some(Item::Nat(b)), Some(Item::Nat(a))) => format!(
                "~ nat table ip {}: ({}) -> ({})",
                crate::intent::state::NAT_TABLE,
                nat_rules(b),
                nat_rules(a)
            ),
            _ => format!("? {:?}", self),
        }
    }

    /// The change that undoes this one, or None when nothing needs undoing (a sysctl of a
    /// device that did not exist before goes away with the device).
    pub fn inverse(&self) -> Option<Change> {
        let op = match self.op {
            Op::Add => Op::Remove,
            Op::Remove => Op::Add,
            Op::Change => Op::Change,
        };
        if matches!(self.after, Some(Item::Sysctl(_))) && self.before.is_none() {
            return None;
        }
        Some(Change {
            op,
            before: self.after.clone(),
            after: self.before.clone(),
        })
    }
}

fn nat_rules(t: &NatTable) -> String {
    if t.rules.is_empty() {
        return "no rules".into();
    }
    t.rules
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

fn updown(up: bool) -> &'static str {
    if up {
        "up"
    } else {
        "down"
    }
}

/// Compare what the config wants with what the host has.
pub fn diff(
    host: &str,
    role: Role,
    desired: &HostState,
    observed: &HostState,
) -> Result<Plan, Conflict> {
    let mut changes = Vec::new();
    let mut push =
        |op, before: Option<Item>, after: Option<Item>| changes.push(Change { op, before, after });

    for (name, want) in &desired.devices {
        if observed.foreign_links.contains(name) {
            return Err(Conflict::ForeignLink { name: name.clone() });
        }
        match observed.devices.get(name) {
            None => push(Op::Add, None, Some(Item::Device(want.clone()))),
            Some(have) if have.kind != want.kind => {
                return Err(Conflict::WrongKind {
                    name: name.clone(),
                    found: have.kind,
                    want: want.kind,
                })
            }
            Some(have) if have != want => push(
                Op::Change,
                Some(Item::Device(have.clone())),
                Some(Item::Device(want.clone())),
            ),
            Some(_) => {}
        }
    }
    for (name, have) in &observed.devices {
        if !desired.devices.contains_key(name) {
            push(Op::Remove, Some(Item::Device(have.clone())), None);
        }
    }

    for a in desired.addresses.difference(&observed.addresses) {
        push(Op::Add, None, Some(Item::Address(a.clone())));
    }
    for a in observed.addresses.difference(&desired.addresses) {
        // Addresses on a device being removed go with it; list them anyway so the plan says so.
        push(Op::Remove, Some(Item::Address(a.clone())), None);
    }

    for (key, want) in &desired.routes {
        match observed.routes.get(key) {
            None => push(Op::Add, None, Some(Item::Route(want.clone()))),
            Some(have) if have != want => push(
                Op::Change,
                Some(Item::Route(have.clone())),
                Some(Item::Route(want.clone())),
            ),
            Some(_) => {}
        }
    }
    for (key, have) in &observed.routes {
        if !desired.routes.contains_key(key) {
            push(Op::Remove, Some(Item::Route(have.clone())), None);
        }
    }

    for (key, want) in &desired.sysctls {
        let after = Some(Item::Sysctl(Sysctl {
            key: key.clone(),
            value: want.clone(),
        }));
        match observed.sysctls.get(key) {
            None => push(Op::Add, None, after),
            Some(have) if have.trim() != want => push(
                Op::Change,
                Some(Item::Sysctl(Sysctl {
                    key: key.clone(),
                    value: have.trim().to_string(),
                })),
                after,
            ),
            Some(_) => {}
        }
    }

    for r in desired.rules.difference(&observed.rules) {
        push(Op::Add, None, Some(Item::Rule(r.clone())));
    }
    for r in observed.rules.difference(&desired.rules) {
        push(Op::Remove, Some(Item::Rule(r.clone())), None);
    }

    if observed.foreign_nat && desired.nat.is_some() {
        return Err(Conflict::ForeignNat);
    }
    match (&desired.nat, &observed.nat) {
        (Some(want), None) => push(Op::Add, None, Some(Item::Nat(want.clone()))),
        (Some(want), Some(have)) if want != have => push(
            Op::Change,
            Some(Item::Nat(have.clone())),
            Some(Item::Nat(want.clone())),
        ),
        (None, Some(have)) => push(Op::Remove, Some(Item::Nat(have.clone())), None),
        _ => {}
    }

    changes.sort_by_key(|c| c.item().phase(c.op));
    Ok(Plan {
        host: host.to_string(),
        role,
        changes,
    })
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    pub fn summary(&self) -> Summary {
        let count = |op| self.changes.iter().filter(|c| c.op == op).count();
        Summary {
            add: count(Op::Add),
            change: count(Op::Change),
            remove: count(Op::Remove),
        }
    }

    /// The changes that undo the first `applied` changes of this plan, in undo order.
    pub fn revert(&self, applied: usize) -> Vec<Change> {
        self.changes[..applied.min(self.changes.len())]
            .iter()
            .rev()
            .filter_map(Change::inverse)
            .collect()
    }

    /// The state `state` would be in after this plan, as a model of the kernel (pure). Used by
    /// tests to check that a plan, applied, gives the desired state.
    pub fn simulate(&self, state: &HostState) -> HostState {
        let mut s = state.clone();
        for c in &self.changes {
            match (&c.before, &c.after) {
                (_, Some(Item::Device(l))) => {
                    s.devices.insert(l.name.clone(), l.clone());
                }
                (Some(Item::Device(l)), None) => {
                    s.devices.remove(&l.name);
                    s.addresses.retain(|a| a.dev != l.name);
                    s.sysctls
                        .retain(|k, _| !k.contains(&format!(".{}.", l.name)));
                }
                (_, Some(Item::Address(a))) => {
                    s.addresses.insert(a.clone());
                }
                (Some(Item::Address(a)), None) => {
                    s.addresses.remove(a);
                }
                (_, Some(Item::Route(r))) => {
                    s.routes.insert(r.key(), r.clone());
                }
                (Some(Item::Route(r)), None) => {
                    s.routes.remove(&r.key());
                }
                (_, Some(Item::Sysctl(x))) => {
                    s.sysctls.insert(x.key.clone(), x.value.clone());
                }
                (_, Some(Item::Nat(t))) => s.nat = Some(t.clone()),
                (_, Some(Item::Rule(r))) => {
                    s.rules.insert(r.clone());
                }
                (Some(Item::Rule(r)), None) => {
                    s.rules.remove(r);
                }
                (Some(Item::Nat(_)), None) => s.nat = None,
                (Some(Item::Sysctl(_)), None) | (None, None) => {}
            }
        }
        s
    }

    pub fn render_text(&self) -> String {
        let mut out = format!("Plan for {} {}:\n", self.role, self.host);
        if self.is_empty() {
            out.push_str("No changes: the host matches the config.\n");
            return out;
        }
        for c in &self.changes {
            out.push_str(&c.line());
            out.push('\n');
        }
        let s = self.summary();
        let _ = writeln!(
            out,
            "Plan: {} to add, {} to change, {} to remove.",
            s.add, s.change, s.remove
        );
        out
    }

    /// JSON form; `status` is unchanged / planned / applied / failed.
    pub fn render_json(&self, error: Option<&str>, status: &str) -> String {
        #[derive(Serialize)]
        struct Out<'a> {
            host: &'a str,
            role: Role,
            status: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            error: Option<&'a str>,
            summary: Summary,
            changes: Vec<JsonChange<'a>>,
        }
        #[derive(Serialize)]
        struct JsonChange<'a> {
            op: Op,
            line: String,
            before: &'a Option<Item>,
            after: &'a Option<Item>,
        }
        let out = Out {
            host: &self.host,
            role: self.role,
            status,
            error,
            summary: self.summary(),
            changes: self
                .changes
                .iter()
                .map(|c| JsonChange {
                    op: c.op,
                    line: c.line(),
                    before: &c.before,
                    after: &c.after,
                })
                .collect(),
        };
        serde_json::to_string_pretty(&out).expect("plan serialises") + "\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intent::state::DeviceKind;

    fn state_with_route(via: &[&str]) -> HostState {
        let mut s = HostState::default();
        for d in via {
            s.add_device(d, DeviceKind::Tun, 1420);
        }
        s.add_route(
            "10.200.0.11/32".parse().unwrap(),
            crate::intent::state::TUNNEL_METRIC,
            via.iter().map(|s| s.to_string()).collect(),
            false,
        );
        s
    }

    #[test]
    fn identical_states_plan_nothing() {
        let s = state_with_route(&["ap-l0", "ap-l1"]);
        assert!(diff("gw1", Role::Gateway, &s, &s).unwrap().is_empty());
    }

    #[test]
    fn a_lost_nexthop_is_a_route_change_not_a_remove_and_add() {
        let want = state_with_route(&["ap-l0", "ap-l1"]);
        let mut have = want.clone();
        have.routes.values_mut().next().unwrap().via = vec!["ap-l0".into()];
        let p = diff("gw1", Role::Gateway, &want, &have).unwrap();
        assert_eq!(p.changes.len(), 1);
        assert_eq!(
            p.changes[0].line(),
            "~ route 10.200.0.11/32 via ap-l0 -> via ap-l0,ap-l1"
        );
    }

    #[test]
    fn routes_leave_before_the_devices_they_use() {
        let want = HostState::default();
        let have = state_with_route(&["ap-l0"]);
        let p = diff("gw1", Role::Gateway, &want, &have).unwrap();
        let lines: Vec<_> = p.changes.iter().map(Change::line).collect();
        assert_eq!(
            lines,
            [
                "- route 10.200.0.11/32 via ap-l0",
                "- link ap-l0 (tun, mtu 1420)"
            ]
        );
    }

    #[test]
    fn revert_undoes_applied_changes_in_reverse_order() {
        let want = state_with_route(&["ap-l0"]);
        let p = diff("gw1", Role::Gateway, &want, &HostState::default()).unwrap();
        let undo: Vec<_> = p.revert(2).iter().map(Change::line).collect();
        assert_eq!(
            undo,
            [
                "- route 10.200.0.11/32 via ap-l0",
                "- link ap-l0 (tun, mtu 1420)"
            ]
        );
    }

    #[test]
    fn a_foreign_device_with_our_name_is_a_conflict() {
        let want = state_with_route(&["ap-l0"]);
        let mut have = HostState::default();
        have.foreign_links.insert("ap-l0".into());
        assert!(matches!(
            diff("gw1", Role::Gateway, &want, &have),
            Err(Conflict::ForeignLink { .. })
        ));
    }
}

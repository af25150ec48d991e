//! Adj-RIB-Out (RFC 4271 §3.2): what we told one peer, so that only differences are sent.
//! Pure.
//!
//! Keys are (prefix, our path identifier): with ADD-PATH (RFC 7911) a peer is told several
//! paths per prefix, each under its own identifier; without it every prefix has the one
//! identifier 0.

use super::wire::{self, Attributes, Nlri, Update};
use ipnet::IpNet;
use std::collections::BTreeMap;

#[derive(Debug, Default)]
pub struct AdjRibOut {
    sent: BTreeMap<Nlri, Attributes>,
}

impl AdjRibOut {
    /// Make the peer's view of `prefix` equal to `want` (path identifier, attributes): the
    /// UPDATEs to send, withdrawals first. Nothing when the peer already holds exactly that.
    pub fn update(&mut self, prefix: IpNet, want: Vec<(u32, Attributes)>) -> Vec<Update> {
        let range = Nlri::from(prefix)..=Nlri {
            prefix,
            path_id: u32::MAX,
        };
        let gone: Vec<Nlri> = self
            .sent
            .range(range)
            .map(|(n, _)| *n)
            .filter(|n| !want.iter().any(|(id, _)| *id == n.path_id))
            .collect();
        for n in &gone {
            self.sent.remove(n);
        }
        let mut msgs = wire::updates(&gone, &[], None);
        for (path_id, a) in want {
            let n = Nlri { prefix, path_id };
            if self.sent.get(&n) != Some(&a) {
                msgs.extend(wire::updates(&[], &[n], Some(&a)));
                self.sent.insert(n, a);
            }
        }
        msgs
    }

    /// Forget what the peer was told (ROUTE-REFRESH: it wants everything again).
    pub fn clear(&mut self) {
        self.sent.clear();
    }

    /// How many (prefix, path) entries the peer holds from us.
    pub fn len(&self) -> usize {
        self.sent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sent.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn attrs(nh: &str) -> Attributes {
        Attributes {
            next_hop: Some(nh.parse::<IpAddr>().unwrap()),
            local_pref: Some(100),
            ..Default::default()
        }
    }

    fn p(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn a_new_route_is_announced_once_and_repeating_it_sends_nothing() {
        let mut out = AdjRibOut::default();
        let u = out.update(p("10.12.0.0/16"), vec![(0, attrs("10.10.0.2"))]);
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].announced, vec![Nlri::from(p("10.12.0.0/16"))]);
        assert_eq!(u[0].attributes, Some(attrs("10.10.0.2")));
        assert!(out
            .update(p("10.12.0.0/16"), vec![(0, attrs("10.10.0.2"))])
            .is_empty());
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn changed_attributes_are_re_announced_without_a_withdrawal() {
        let mut out = AdjRibOut::default();
        out.update(p("10.12.0.0/16"), vec![(0, attrs("10.10.0.2"))]);
        let u = out.update(p("10.12.0.0/16"), vec![(0, attrs("10.10.0.3"))]);
        assert_eq!(u.len(), 1);
        assert!(u[0].withdrawn.is_empty());
        assert_eq!(u[0].attributes, Some(attrs("10.10.0.3")));
    }

    #[test]
    fn a_route_no_longer_wanted_is_withdrawn_and_only_that_path() {
        let mut out = AdjRibOut::default();
        out.update(
            p("10.12.0.0/16"),
            vec![(1, attrs("10.10.0.2")), (2, attrs("10.10.0.3"))],
        );
        out.update(p("10.13.0.0/16"), vec![(1, attrs("10.10.0.2"))]);
        // The path through 10.10.0.3 goes; the other path and the other prefix stay.
        let u = out.update(p("10.12.0.0/16"), vec![(1, attrs("10.10.0.2"))]);
        assert_eq!(u.len(), 1);
        assert_eq!(
            u[0].withdrawn,
            vec![Nlri {
                prefix: p("10.12.0.0/16"),
                path_id: 2
            }]
        );
        assert!(u[0].announced.is_empty());
        assert_eq!(out.len(), 2);
        let u = out.update(p("10.12.0.0/16"), vec![]);
        assert_eq!(u[0].withdrawn.len(), 1);
        assert!(
            out.update(p("10.12.0.0/16"), vec![]).is_empty(),
            "withdrawn once"
        );
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn a_covering_prefix_does_not_disturb_a_more_specific_one() {
        let mut out = AdjRibOut::default();
        out.update(p("10.12.0.0/16"), vec![(0, attrs("10.10.0.2"))]);
        out.update(p("10.12.0.0/24"), vec![(0, attrs("10.10.0.2"))]);
        let u = out.update(p("10.12.0.0/16"), vec![]);
        assert_eq!(u[0].withdrawn, vec![Nlri::from(p("10.12.0.0/16"))]);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn after_clear_everything_is_sent_again() {
        let mut out = AdjRibOut::default();
        out.update(p("10.12.0.0/16"), vec![(0, attrs("10.10.0.2"))]);
        out.clear();
        assert!(out.is_empty());
        assert_eq!(
            out.update(p("10.12.0.0/16"), vec![(0, attrs("10.10.0.2"))])
                .len(),
            1
        );
    }
}

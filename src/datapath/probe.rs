//! The in-band liveness probe: a tiny IPv4 packet inside the tunnel that a receiving appliance
//! consumes before its tun device. Plain WireGuard keepalives cannot say "I hear you", and
//! without that a link that fails in one direction looks alive from the side that still
//! receives. Protocol 253 (RFC 3692, experiments), source and destination 0.0.0.0, so a
//! non-appliance peer that receives one drops it as a martian.

const MAGIC: &[u8; 4] = b"APLV";
const LEN: usize = 20 + 8;

/// What a probe says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// The sender hears us.
    pub hears_you: bool,
    /// The sender is a drained gateway: route through it only when nothing else is live.
    pub draining: bool,
    /// The sender (a gateway) asks this node to drain (`appliance drain NODE` there).
    pub drain_you: bool,
    /// The sender's site file lists a next key for us, starting with these 3 bytes: it takes
    /// handshakes signed with it, so a key rotation may move this link (a stale file listing
    /// an earlier next key does not match).
    pub next_tag: Option<[u8; 3]>,
}

/// The tag a probe carries for `key`: its first 3 bytes.
pub fn tag(key: &crate::model::key::PublicKey) -> [u8; 3] {
    [key.0[0], key.0[1], key.0[2]]
}

pub fn packet(probe: Probe) -> [u8; LEN] {
    let mut p = [0u8; LEN];
    p[0] = 0x45;
    p[3] = LEN as u8;
    p[8] = 1;
    p[9] = 253;
    let sum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p[20..24].copy_from_slice(MAGIC);
    p[24] = u8::from(probe.hears_you)
        | (u8::from(probe.draining) << 1)
        | (u8::from(probe.next_tag.is_some()) << 2)
        | (u8::from(probe.drain_you) << 3);
    if let Some(t) = probe.next_tag {
        p[25..28].copy_from_slice(&t);
    }
    p
}

/// What `p` says, if it is a probe. (Bits 1, 2 and 3 were 0 before draining, key rotation and
/// node drains from the gateways existed: an older peer never looks drained, nor ready for a
/// next key, nor asks a node to drain.)
pub fn parse(p: &[u8]) -> Option<Probe> {
    (p.len() == LEN && p[0] == 0x45 && p[9] == 253 && p[12..20] == [0; 8] && &p[20..24] == MAGIC)
        .then(|| Probe {
            hears_you: p[24] & 1 == 1,
            draining: p[24] & 2 == 2,
            drain_you: p[24] & 8 == 8,
            next_tag: (p[24] & 4 == 4).then(|| [p[25], p[26], p[27]]),
        })
}

/// The IPv4 header checksum of `h`.
pub(crate) fn checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bit_survives_the_round_trip_and_a_plain_packet_is_no_probe() {
        for bits in 0..16u8 {
            let probe = Probe {
                hears_you: bits & 1 != 0,
                draining: bits & 2 != 0,
                drain_you: bits & 8 != 0,
                next_tag: (bits & 4 != 0).then_some([1, 2, bits]),
            };
            assert_eq!(parse(&packet(probe)), Some(probe));
        }
        let mut p = packet(Probe {
            hears_you: true,
            draining: false,
            drain_you: false,
            next_tag: None,
        });
        p[20] = b'X';
        assert_eq!(parse(&p), None);
    }
}

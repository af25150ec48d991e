//! Which tun queue a decrypted packet goes to (pure).
//!
//! The kernel sends a flow's outgoing packets on the tun queue its last incoming packet was
//! written to (tun's automatic flow steering). So the receive side decides the spread in both
//! directions: it writes every packet of a flow to one queue, chosen by a hash of the flow, and
//! the flows' replies leave on as many queues as their hashes spread over. Left to itself, the
//! kernel would learn every flow on the one queue whose socket the peer's datagrams arrive on.

/// The queue (of `queues`) for `packet`, an IPv4 or IPv6 packet: the same for every packet of
/// one flow (addresses, protocol and, for TCP and UDP, ports). Fragments hash by addresses and
/// protocol alone, so all fragments of a datagram stay together.
pub fn queue_of(packet: &[u8], queues: usize) -> usize {
    if queues <= 1 {
        return 0;
    }
    let h = flow_hash(packet);
    // Multiply and shift: an even spread without a division.
    ((u64::from(h) * queues as u64) >> 32) as usize
}

fn flow_hash(p: &[u8]) -> u32 {
    let mut h = Fold::default();
    match p.first().map(|b| b >> 4) {
        Some(4) if p.len() >= 20 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let proto = p[9];
            h.bytes(&p[12..20]);
            h.word(u32::from(proto));
            let fragmented = u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0;
            if !fragmented && matches!(proto, 6 | 17) && p.len() >= ihl + 4 && ihl >= 20 {
                h.bytes(&p[ihl..ihl + 4]);
            }
        }
        Some(6) if p.len() >= 40 => {
            let next = p[6];
            h.bytes(&p[8..40]);
            h.word(u32::from(next));
            if matches!(next, 6 | 17) && p.len() >= 44 {
                h.bytes(&p[40..44]);
            }
        }
        _ => h.bytes(p.get(..p.len().min(20)).unwrap_or(&[])),
    }
    h.finish()
}

/// A small multiplicative hash (FxHash's step): cheap, and spread enough for a handful of
/// queues. Not keyed: a peer that picks its flows to land on one queue only slows itself.
#[derive(Default)]
struct Fold(u64);

impl Fold {
    fn word(&mut self, w: u32) {
        self.0 = (self.0.rotate_left(5) ^ u64::from(w)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn bytes(&mut self, b: &[u8]) {
        for c in b.chunks(4) {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            self.word(u32::from_le_bytes(w));
        }
    }

    fn finish(&self) -> u32 {
        (self.0 >> 32) as u32 ^ self.0 as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(src: [u8; 4], dst: [u8; 4], proto: u8, sport: u16, dport: u16, frag: u16) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[6..8].copy_from_slice(&frag.to_be_bytes());
        p[9] = proto;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p
    }

    #[test]
    fn one_flow_one_queue_and_flows_spread_over_all_queues() {
        let a = v4([10, 0, 0, 1], [10, 0, 0, 2], 6, 40000, 5201, 0);
        let mut later = a.clone();
        later.extend_from_slice(&[0xaa; 1000]);
        later[30] = 0x55; // other payload, other length: same flow
        assert_eq!(queue_of(&a, 2), queue_of(&later, 2));
        for queues in [2, 3, 4, 8] {
            let mut hits = vec![0u32; queues];
            for sport in 0..4000u16 {
                let p = v4([10, 0, 0, 1], [10, 0, 0, 2], 6, 30000 + sport, 5201, 0);
                hits[queue_of(&p, queues)] += 1;
            }
            let even = 4000 / queues as u32;
            for h in &hits {
                assert!(
                    *h > even * 8 / 10 && *h < even * 12 / 10,
                    "{queues}: {hits:?}"
                );
            }
        }
    }

    #[test]
    fn fragments_of_one_datagram_stay_together() {
        // The first fragment (more-fragments set) carries ports, the next ones other bytes.
        let first = v4([10, 0, 0, 1], [10, 0, 0, 2], 17, 1234, 2049, 0x2000);
        let next = v4([10, 0, 0, 1], [10, 0, 0, 2], 17, 9, 9, 0x00b9);
        for queues in [2, 4, 8] {
            assert_eq!(queue_of(&first, queues), queue_of(&next, queues));
        }
    }

    #[test]
    fn ipv6_flows_spread_and_garbage_has_a_queue() {
        let mut hits = [0u32; 2];
        for sport in 0..1000u16 {
            let mut p = vec![0u8; 60];
            p[0] = 0x60;
            p[6] = 6;
            p[8..24].copy_from_slice(&[0xfd; 16]);
            p[24..40].copy_from_slice(&[0xfe; 16]);
            p[40..42].copy_from_slice(&sport.to_be_bytes());
            hits[queue_of(&p, 2)] += 1;
        }
        assert!(hits.iter().all(|h| *h > 400), "{hits:?}");
        for junk in [&[][..], &[0x45][..], &[0x60; 10][..], &[0xff; 3][..]] {
            assert!(queue_of(junk, 3) < 3);
        }
        assert_eq!(queue_of(&[0x45; 40], 1), 0);
    }
}

//! TCP MSS clamping for packets crossing a tunnel. Pure.
//!
//! A site host on a 1500-byte LAN and a cloud host behind a node (a container, a VM on a
//! bridge) both announce an MSS for 1500-byte packets; the tunnel carries `mtu` (1420 by
//! default), so their full-sized segments only fit once ICMP "fragmentation needed" (IPv6:
//! "packet too big") reaches the sender, and many site firewalls drop it: large transfers
//! stall. Rewriting the MSS option of every SYN that enters or leaves a tunnel to at most
//! `mtu - 40` (IPv4) or `mtu - 60` (IPv6) makes both ends send segments that fit, whatever
//! happens to ICMP. The checksum is updated incrementally (RFC 1624), also when the option
//! sits at an odd offset.

/// IPv4 header (20) + TCP header (20).
const V4_OVERHEAD: u32 = 40;
/// IPv6 header (40) + TCP header (20).
const V6_OVERHEAD: u32 = 60;
const TCP: u8 = 6;
const SYN: u8 = 0x02;

/// If `packet` is a TCP SYN (or SYN-ACK) whose MSS option exceeds what a tunnel of `mtu`
/// carries, lower it and fix the TCP checksum. Returns whether the packet changed. Anything
/// else (not IP, not TCP, not a SYN, a non-first fragment, truncated) is left alone.
pub fn clamp(packet: &mut [u8], mtu: u32) -> bool {
    let Some((tcp, max)) = tcp_offset(packet, mtu) else {
        return false;
    };
    if tcp > packet.len() {
        return false;
    }
    let seg = &mut packet[tcp..];
    if seg.len() < 20 || seg[13] & SYN == 0 {
        return false;
    }
    let header = ((seg[12] >> 4) as usize) * 4;
    if header < 20 || header > seg.len() {
        return false;
    }
    let mut i = 20;
    while i < header {
        match seg[i] {
            0 => break,
            1 => i += 1,
            kind => {
                let Some(&len) = seg.get(i + 1) else { break };
                let len = len as usize;
                if len < 2 || i + len > header {
                    break;
                }
                if kind == 2 && len == 4 {
                    let old = u16::from_be_bytes([seg[i + 2], seg[i + 3]]);
                    if u32::from(old) <= max {
                        return false;
                    }
                    let new = max as u16;
                    seg[i + 2..i + 4].copy_from_slice(&new.to_be_bytes());
                    let sum = u16::from_be_bytes([seg[16], seg[17]]);
                    // A field at an odd offset adds to the sum byte-swapped.
                    let (o, n) = if (tcp + i + 2) % 2 == 0 {
                        (old, new)
                    } else {
                        (old.swap_bytes(), new.swap_bytes())
                    };
                    seg[16..18].copy_from_slice(&update(sum, o, n).to_be_bytes());
                    return true;
                }
                i += len;
            }
        }
    }
    false
}

/// Is `packet` a TCP SYN (or SYN-ACK)? A cheap test before copying a packet to clamp it.
pub fn is_syn(packet: &[u8]) -> bool {
    matches!(tcp_offset(packet, 0), Some((at, _)) if packet.get(at + 13).is_some_and(|f| f & SYN != 0))
}

/// Is `packet` the first SYN of a new TCP connection (SYN without ACK)?
pub fn is_new_connection(packet: &[u8]) -> bool {
    const ACK: u8 = 0x10;
    matches!(tcp_offset(packet, 0), Some((at, _)) if packet.get(at + 13).is_some_and(|f| f & SYN != 0 && f & ACK == 0))
}

/// Where the TCP header starts and the largest MSS for this family, if `packet` is an
/// unfragmented (or first-fragment) TCP packet.
fn tcp_offset(p: &[u8], mtu: u32) -> Option<(usize, u32)> {
    match p.first()? >> 4 {
        4 => {
            let ihl = ((p[0] & 0x0f) as usize) * 4;
            if p.len() < 20 || ihl < 20 || p[9] != TCP {
                return None;
            }
            let frag_offset = u16::from_be_bytes([p[6], p[7]]) & 0x1fff;
            (frag_offset == 0).then_some((ihl, mtu.saturating_sub(V4_OVERHEAD)))
        }
        6 => {
            if p.len() < 40 {
                return None;
            }
            // Walk the extension headers that may precede TCP (hop-by-hop, routing,
            // destination options); a fragment header or anything else: leave it.
            let (mut next, mut at) = (p[6], 40);
            for _ in 0..8 {
                match next {
                    TCP => return Some((at, mtu.saturating_sub(V6_OVERHEAD))),
                    0 | 43 | 60 => {
                        let len = (*p.get(at + 1)? as usize + 1) * 8;
                        next = *p.get(at)?;
                        at += len;
                    }
                    _ => return None,
                }
            }
            None
        }
        _ => None,
    }
}

/// RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), in ones' complement arithmetic.
fn update(sum: u16, old: u16, new: u16) -> u16 {
    let mut s = u32::from(!sum) + u32::from(!old) + u32::from(new);
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The Internet checksum of `data` plus `initial` (ones' complement sum, folded, inverted).
    fn checksum(initial: u32, data: &[u8]) -> u16 {
        let mut s = initial;
        for c in data.chunks(2) {
            s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }

    fn pseudo_v4(p: &[u8], tcp_len: usize) -> u32 {
        let mut s = 0u32;
        for c in p[12..20].chunks(2) {
            s += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        s + u32::from(TCP) + tcp_len as u32
    }

    fn pseudo_v6(p: &[u8], tcp_len: usize) -> u32 {
        let mut s = 0u32;
        for c in p[8..40].chunks(2) {
            s += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        s + u32::from(TCP) + tcp_len as u32
    }

    /// A TCP segment with `options` (padded to 4 bytes), flags, and a correct checksum
    /// computed by the caller's pseudo header.
    fn tcp(options: &[u8], flags: u8) -> Vec<u8> {
        let mut opts = options.to_vec();
        while !opts.len().is_multiple_of(4) {
            opts.push(1);
        }
        let mut t = vec![0x9c, 0x40, 0x08, 0x01, 0, 0, 0, 1, 0, 0, 0, 0];
        t.push((((20 + opts.len()) / 4) as u8) << 4);
        t.push(flags);
        t.extend_from_slice(&[0xfa, 0xf0, 0, 0, 0, 0]);
        t.extend_from_slice(&opts);
        t
    }

    fn v4(seg: Vec<u8>) -> Vec<u8> {
        let len = 20 + seg.len();
        let mut p = vec![
            0x45,
            0,
            (len >> 8) as u8,
            len as u8,
            0,
            1,
            0x40,
            0,
            64,
            TCP,
            0,
            0,
        ];
        p.extend_from_slice(&[10, 10, 0, 5, 10, 200, 0, 12]);
        p.extend_from_slice(&seg);
        let c = checksum(pseudo_v4(&p, seg.len()), &p[20..]);
        p[36..38].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn v6(ext: &[u8], seg: Vec<u8>) -> Vec<u8> {
        let payload = ext.len() + seg.len();
        let next = if ext.is_empty() { TCP } else { 0 };
        let mut p = vec![0x60, 0, 0, 0, (payload >> 8) as u8, payload as u8, next, 64];
        p.extend_from_slice(&[
            0x20, 0x01, 0x0d, 0xb8, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5,
        ]);
        p.extend_from_slice(&[
            0x20, 0x01, 0x0d, 0xb8, 2, 0, 0, 0x11, 0, 0, 0, 0, 0, 0, 0, 1,
        ]);
        p.extend_from_slice(ext);
        let at = p.len();
        p.extend_from_slice(&seg);
        let c = checksum(pseudo_v6(&p, seg.len()), &p[at..]);
        p[at + 16..at + 18].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn mss_of(p: &[u8], tcp: usize) -> Option<u16> {
        let seg = &p[tcp..];
        let header = ((seg[12] >> 4) as usize) * 4;
        let mut i = 20;
        while i < header {
            match seg[i] {
                0 => return None,
                1 => i += 1,
                2 => return Some(u16::from_be_bytes([seg[i + 2], seg[i + 3]])),
                _ => i += seg[i + 1] as usize,
            }
        }
        None
    }

    const MSS_1460: [u8; 4] = [2, 4, 0x05, 0xb4];

    #[test]
    fn an_ipv4_syn_is_clamped_to_the_tunnel_mtu_and_its_checksum_still_verifies() {
        let mut p = v4(tcp(&MSS_1460, SYN));
        assert!(clamp(&mut p, 1420));
        assert_eq!(mss_of(&p, 20), Some(1380));
        assert_eq!(checksum(pseudo_v4(&p, p.len() - 20), &p[20..]), 0);
        assert!(!clamp(&mut p, 1420), "already small enough: untouched");
        assert!(is_syn(&p) && !is_syn(&v4(tcp(&MSS_1460, 0x10))));
    }

    #[test]
    fn an_ipv6_syn_ack_behind_a_hop_by_hop_header_is_clamped() {
        let hop_by_hop = [TCP, 0, 1, 4, 0, 0, 0, 0];
        let mut p = v6(&hop_by_hop, tcp(&MSS_1460, SYN | 0x10));
        assert!(clamp(&mut p, 1420));
        assert_eq!(mss_of(&p, 48), Some(1360));
        assert_eq!(checksum(pseudo_v6(&p, p.len() - 48), &p[48..]), 0);
    }

    #[test]
    fn a_smaller_mss_non_syns_and_other_packets_are_left_alone() {
        let mut small = v4(tcp(&[2, 4, 0x04, 0x00], SYN));
        let before = small.clone();
        assert!(!clamp(&mut small, 1420));
        assert_eq!(small, before);
        let mut data = v4(tcp(&MSS_1460, 0x10));
        assert!(
            !clamp(&mut data, 1420),
            "an ACK carrying the option is not a SYN"
        );
        let mut udp = v4(tcp(&MSS_1460, SYN));
        udp[9] = 17;
        assert!(!clamp(&mut udp, 1420));
        let mut fragment = v4(tcp(&MSS_1460, SYN));
        fragment[7] = 8;
        assert!(
            !clamp(&mut fragment, 1420),
            "a later fragment carries no TCP header"
        );
        for truncated in 0..40 {
            let mut p = v4(tcp(&MSS_1460, SYN))[..truncated].to_vec();
            assert!(!clamp(&mut p, 1420));
        }
    }

    proptest! {
        /// Whatever options come before it (so the MSS lands at odd and even offsets), the
        /// clamped SYN has the clamped MSS and a checksum that verifies from scratch.
        #[test]
        fn the_incremental_checksum_matches_a_full_recompute(
            nops in 0usize..3,
            mss in 1000u16..=9000,
            mtu in 1280u32..=1500,
            v6_packet: bool,
            payload in proptest::collection::vec(any::<u8>(), 0..7),
        ) {
            let mut opts = vec![1u8; nops];
            opts.extend_from_slice(&[2, 4, (mss >> 8) as u8, mss as u8]);
            opts.extend_from_slice(&[4, 2]); // SACK permitted
            let mut seg = tcp(&opts, SYN);
            seg.extend_from_slice(&payload); // SYN data (TFO): odd lengths too
            let (mut p, at) = if v6_packet { (v6(&[], seg), 40) } else { (v4(seg), 20) };
            let max = mtu - if v6_packet { 60 } else { 40 };
            let changed = clamp(&mut p, mtu);
            prop_assert_eq!(changed, u32::from(mss) > max);
            prop_assert_eq!(u32::from(mss_of(&p, at).unwrap()), u32::from(mss).min(max));
            let pseudo = if v6_packet { pseudo_v6(&p, p.len() - at) } else { pseudo_v4(&p, p.len() - at) };
            prop_assert_eq!(checksum(pseudo, &p[at..]), 0);
        }

        #[test]
        fn arbitrary_bytes_never_panic(mut p in proptest::collection::vec(any::<u8>(), 0..200), mtu in 0u32..10_000) {
            clamp(&mut p, mtu);
        }
    }
}

//! The in-band liveness probe: a tiny IPv4 packet inside the tunnel that a receiving appliance
//! consumes before its tun device. Plain WireGuard keepalives cannot say "I hear you", and
//! without that a link that fails in one direction looks alive from the side that still
//! receives. Protocol 253 (RFC 3692, experiments), source and destination 0.0.0.0, so a
//! non-appliance peer that receives one drops it as a martian.

const MAGIC: &[u8; 4] = b"APLV";
const LEN: usize = 20 + 8;

pub fn packet(hears_you: bool) -> [u8; LEN] {
    let mut p = [0u8; LEN];
    p[0] = 0x45;
    p[3] = LEN as u8;
    p[8] = 1;
    p[9] = 253;
    let sum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p[20..24].copy_from_slice(MAGIC);
    p[24] = u8::from(hears_you);
    p
}

/// `Some(hears_you)` if `p` is a probe.
pub fn parse(p: &[u8]) -> Option<bool> {
    (p.len() == LEN && p[0] == 0x45 && p[9] == 253 && p[12..20] == [0; 8] && &p[20..24] == MAGIC)
        .then(|| p[24] & 1 == 1)
}

fn checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

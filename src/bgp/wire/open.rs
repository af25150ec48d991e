//! OPEN (RFC 4271 §4.2) and its capabilities (RFC 5492): multiprotocol, route refresh,
//! 4-octet AS, graceful restart, ADD-PATH.

use super::*;
use std::net::Ipv4Addr;

/// OPEN (RFC 4271 §4.2). `asn` is the real AS: the 4-octet capability's value when present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub asn: u32,
    pub hold_time: u16,
    pub bgp_id: Ipv4Addr,
    pub capabilities: Vec<Capability>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capability {
    /// RFC 4760 (code 1).
    Multiprotocol {
        afi: u16,
        safi: u8,
    },
    /// RFC 2918 (code 2).
    RouteRefresh,
    /// RFC 4724 (code 64): restart flags (R bit), restart time, per-family forwarding state.
    GracefulRestart {
        restarting: bool,
        time: u16,
        families: Vec<(u16, u8, bool)>,
    },
    /// RFC 6793 (code 65).
    FourOctetAs(u32),
    /// RFC 7911 (code 69): (afi, safi, send/receive bits).
    AddPath(Vec<(u16, u8, u8)>),
    Unknown {
        code: u8,
        value: Vec<u8>,
    },
}

pub(super) fn decode_open(b: &[u8]) -> Result<Open, DecodeError> {
    if b.len() < 10 {
        return Err(err(1, 2, &[], "OPEN shorter than 29 bytes"));
    }
    if b[0] != 4 {
        return Err(err(2, 1, &[0, 4], format!("BGP version {} (only 4)", b[0])));
    }
    let my_as = u16::from_be_bytes([b[1], b[2]]);
    let hold_time = u16::from_be_bytes([b[3], b[4]]);
    if hold_time == 1 || hold_time == 2 {
        return Err(err(2, 6, &[], format!("hold time {hold_time}")));
    }
    let bgp_id = Ipv4Addr::new(b[5], b[6], b[7], b[8]);
    if bgp_id.is_unspecified() || bgp_id.is_multicast() || bgp_id.is_broadcast() {
        return Err(err(2, 3, &[], format!("BGP identifier {bgp_id}")));
    }
    let opt_len = b[9] as usize;
    let params = b
        .get(10..10 + opt_len)
        .ok_or_else(|| err(1, 2, &[], "optional parameters overrun the OPEN"))?;
    if 10 + opt_len != b.len() {
        return Err(err(1, 2, &[], "OPEN length disagrees with its parameters"));
    }
    let mut caps = Vec::new();
    let mut p = params;
    while !p.is_empty() {
        if p.len() < 2 {
            return Err(err(2, 0, &[], "truncated optional parameter"));
        }
        let (ptype, plen) = (p[0], p[1] as usize);
        let value = p
            .get(2..2 + plen)
            .ok_or_else(|| err(2, 0, &[], "optional parameter overruns"))?;
        if ptype != 2 {
            return Err(err(
                2,
                4,
                &[],
                format!("unsupported optional parameter {ptype}"),
            ));
        }
        decode_capabilities(value, &mut caps)?;
        p = &p[2 + plen..];
    }
    let asn = caps
        .iter()
        .find_map(|c| match c {
            Capability::FourOctetAs(a) => Some(*a),
            _ => None,
        })
        .unwrap_or(my_as as u32);
    Ok(Open {
        asn,
        hold_time,
        bgp_id,
        capabilities: caps,
    })
}

pub(super) fn decode_capabilities(
    mut v: &[u8],
    caps: &mut Vec<Capability>,
) -> Result<(), DecodeError> {
    while !v.is_empty() {
        if v.len() < 2 {
            return Err(err(2, 0, &[], "truncated capability"));
        }
        let (code, len) = (v[0], v[1] as usize);
        let value = v
            .get(2..2 + len)
            .ok_or_else(|| err(2, 0, &[], "capability overruns its parameter"))?;
        let bad = || err(2, 0, &[], format!("capability {code} has bad length {len}"));
        caps.push(match code {
            1 => {
                if len != 4 {
                    return Err(bad());
                }
                Capability::Multiprotocol {
                    afi: u16::from_be_bytes([value[0], value[1]]),
                    safi: value[3],
                }
            }
            2 => Capability::RouteRefresh,
            64 => {
                if len < 2 || (len - 2) % 4 != 0 {
                    return Err(bad());
                }
                let word = u16::from_be_bytes([value[0], value[1]]);
                Capability::GracefulRestart {
                    restarting: word & 0x8000 != 0,
                    time: word & 0x0fff,
                    families: value[2..]
                        .chunks(4)
                        .map(|c| (u16::from_be_bytes([c[0], c[1]]), c[2], c[3] & 0x80 != 0))
                        .collect(),
                }
            }
            65 => {
                if len != 4 {
                    return Err(bad());
                }
                Capability::FourOctetAs(u32::from_be_bytes([
                    value[0], value[1], value[2], value[3],
                ]))
            }
            69 => {
                if len % 4 != 0 {
                    return Err(bad());
                }
                Capability::AddPath(
                    value
                        .chunks(4)
                        .map(|c| (u16::from_be_bytes([c[0], c[1]]), c[2], c[3]))
                        .collect(),
                )
            }
            _ => Capability::Unknown {
                code,
                value: value.to_vec(),
            },
        });
        v = &v[2 + len..];
    }
    Ok(())
}

pub(super) fn encode_open(o: &Open) -> Vec<u8> {
    let mut caps = Vec::new();
    for c in &o.capabilities {
        let (code, value): (u8, Vec<u8>) = match c {
            Capability::Multiprotocol { afi, safi } => {
                (1, vec![(afi >> 8) as u8, *afi as u8, 0, *safi])
            }
            Capability::RouteRefresh => (2, vec![]),
            Capability::GracefulRestart {
                restarting,
                time,
                families,
            } => {
                let word = (*time & 0x0fff) | if *restarting { 0x8000 } else { 0 };
                let mut v = word.to_be_bytes().to_vec();
                for (afi, safi, fwd) in families {
                    v.extend_from_slice(&afi.to_be_bytes());
                    v.extend_from_slice(&[*safi, if *fwd { 0x80 } else { 0 }]);
                }
                (64, v)
            }
            Capability::FourOctetAs(a) => (65, a.to_be_bytes().to_vec()),
            Capability::AddPath(v) => (
                69,
                v.iter()
                    .flat_map(|(afi, safi, sr)| [(afi >> 8) as u8, *afi as u8, *safi, *sr])
                    .collect(),
            ),
            Capability::Unknown { code, value } => (*code, value.clone()),
        };
        caps.push(code);
        caps.push(value.len() as u8);
        caps.extend_from_slice(&value);
    }
    let my_as = if o.asn > u16::MAX as u32 {
        AS_TRANS
    } else {
        o.asn as u16
    };
    let mut b = vec![4];
    b.extend_from_slice(&my_as.to_be_bytes());
    b.extend_from_slice(&o.hold_time.to_be_bytes());
    b.extend_from_slice(&o.bgp_id.octets());
    if caps.is_empty() {
        b.push(0);
    } else {
        b.push((caps.len() + 2) as u8);
        b.push(2);
        b.push(caps.len() as u8);
        b.extend_from_slice(&caps);
    }
    b
}

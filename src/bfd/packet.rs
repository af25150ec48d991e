//! The BFD Control packet (RFC 5880 §4.1), without authentication: encode, and decode with
//! every reception check of §6.8.6 that needs no session state.

use std::time::Duration;

/// Length of a Control packet without an authentication section.
pub const LEN: usize = 24;

/// Session states (RFC 5880 §4.1, `Sta`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    AdminDown = 0,
    Down = 1,
    Init = 2,
    Up = 3,
}

impl State {
    fn from_bits(b: u8) -> State {
        match b & 3 {
            0 => State::AdminDown,
            1 => State::Down,
            2 => State::Init,
            _ => State::Up,
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::AdminDown => "AdminDown",
            State::Down => "Down",
            State::Init => "Init",
            State::Up => "Up",
        })
    }
}

/// Diagnostic codes (RFC 5880 §4.1) this implementation sets or reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Diag {
    None,
    /// 1: Control Detection Time Expired.
    DetectionExpired,
    /// 3: Neighbor Signaled Session Down.
    NeighborDown,
    /// 7: Administratively Down.
    AdminDown,
    /// Any other code a peer sends.
    Other(u8),
}

impl Diag {
    pub fn code(self) -> u8 {
        match self {
            Diag::None => 0,
            Diag::DetectionExpired => 1,
            Diag::NeighborDown => 3,
            Diag::AdminDown => 7,
            Diag::Other(c) => c & 0x1f,
        }
    }

    fn from_code(c: u8) -> Diag {
        match c & 0x1f {
            0 => Diag::None,
            1 => Diag::DetectionExpired,
            3 => Diag::NeighborDown,
            7 => Diag::AdminDown,
            c => Diag::Other(c),
        }
    }
}

impl std::fmt::Display for Diag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Diag::None => f.write_str("no diagnostic"),
            Diag::DetectionExpired => f.write_str("control detection time expired"),
            Diag::NeighborDown => f.write_str("neighbor signaled session down"),
            Diag::AdminDown => f.write_str("administratively down"),
            Diag::Other(c) => write!(f, "diagnostic {c}"),
        }
    }
}

/// A Control packet. Intervals travel in microseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    pub diag: Diag,
    pub state: State,
    pub poll: bool,
    pub final_: bool,
    pub demand: bool,
    pub detect_mult: u8,
    pub my_discr: u32,
    pub your_discr: u32,
    pub desired_min_tx: Duration,
    pub required_min_rx: Duration,
    pub required_min_echo_rx: Duration,
}

/// Why a datagram is not a usable Control packet (RFC 5880 §6.8.6: discarded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    TooShort(usize),
    Version(u8),
    Length {
        field: u8,
        datagram: usize,
    },
    ZeroDetectMult,
    Multipoint,
    ZeroMyDiscriminator,
    /// Authentication is not configured here, so an authenticated packet is discarded.
    Authenticated,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Invalid::TooShort(n) => write!(f, "{n} bytes, shorter than a BFD control packet"),
            Invalid::Version(v) => write!(f, "BFD version {v}, not 1"),
            Invalid::Length { field, datagram } => {
                write!(
                    f,
                    "length field {field} does not fit a {datagram}-byte datagram"
                )
            }
            Invalid::ZeroDetectMult => f.write_str("detect multiplier 0"),
            Invalid::Multipoint => f.write_str("multipoint bit set"),
            Invalid::ZeroMyDiscriminator => f.write_str("my discriminator 0"),
            Invalid::Authenticated => f.write_str("authenticated packet, no authentication here"),
        }
    }
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u32::MAX as u128) as u32
}

impl Control {
    pub fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[0] = (1 << 5) | self.diag.code();
        b[1] = ((self.state as u8) << 6)
            | (u8::from(self.poll) << 5)
            | (u8::from(self.final_) << 4)
            | (u8::from(self.demand) << 1);
        b[2] = self.detect_mult;
        b[3] = LEN as u8;
        b[4..8].copy_from_slice(&self.my_discr.to_be_bytes());
        b[8..12].copy_from_slice(&self.your_discr.to_be_bytes());
        b[12..16].copy_from_slice(&micros(self.desired_min_tx).to_be_bytes());
        b[16..20].copy_from_slice(&micros(self.required_min_rx).to_be_bytes());
        b[20..24].copy_from_slice(&micros(self.required_min_echo_rx).to_be_bytes());
        b
    }

    /// Decode a UDP payload, applying the checks of §6.8.6 that need no session.
    pub fn decode(b: &[u8]) -> Result<Control, Invalid> {
        if b.len() < LEN {
            return Err(Invalid::TooShort(b.len()));
        }
        let version = b[0] >> 5;
        if version != 1 {
            return Err(Invalid::Version(version));
        }
        let auth = b[1] & 0x04 != 0;
        let min = if auth { LEN + 2 } else { LEN };
        let length = b[3];
        if (length as usize) < min || length as usize > b.len() {
            return Err(Invalid::Length {
                field: length,
                datagram: b.len(),
            });
        }
        if b[2] == 0 {
            return Err(Invalid::ZeroDetectMult);
        }
        if b[1] & 0x01 != 0 {
            return Err(Invalid::Multipoint);
        }
        let word = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        if word(4) == 0 {
            return Err(Invalid::ZeroMyDiscriminator);
        }
        if auth {
            return Err(Invalid::Authenticated);
        }
        let us = |i: usize| Duration::from_micros(word(i) as u64);
        Ok(Control {
            diag: Diag::from_code(b[0]),
            state: State::from_bits(b[1] >> 6),
            poll: b[1] & 0x20 != 0,
            final_: b[1] & 0x10 != 0,
            demand: b[1] & 0x02 != 0,
            detect_mult: b[2],
            my_discr: word(4),
            your_discr: word(8),
            desired_min_tx: us(12),
            required_min_rx: us(16),
            required_min_echo_rx: us(20),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Control {
        Control {
            diag: Diag::NeighborDown,
            state: State::Init,
            poll: true,
            final_: false,
            demand: false,
            detect_mult: 3,
            my_discr: 0x01020304,
            your_discr: 7,
            desired_min_tx: Duration::from_millis(100),
            required_min_rx: Duration::from_millis(300),
            required_min_echo_rx: Duration::ZERO,
        }
    }

    #[test]
    fn a_control_packet_has_the_rfc_layout() {
        let b = sample().encode();
        assert_eq!(b[0], 0x23, "version 1, diag 3");
        assert_eq!(b[1], 0x80 | 0x20, "Init, poll");
        assert_eq!((b[2], b[3]), (3, 24));
        assert_eq!(&b[4..8], &[1, 2, 3, 4]);
        assert_eq!(&b[12..16], &100_000u32.to_be_bytes());
        assert_eq!(&b[16..20], &300_000u32.to_be_bytes());
        assert_eq!(Control::decode(&b), Ok(sample()));
    }

    #[test]
    fn every_sessionless_reception_check_discards() {
        let good = sample().encode();
        let with = |i: usize, v: u8| {
            let mut b = good;
            b[i] = v;
            Control::decode(&b)
        };
        assert_eq!(Control::decode(&good[..23]), Err(Invalid::TooShort(23)));
        assert_eq!(with(0, 0x43), Err(Invalid::Version(2)));
        assert!(matches!(with(3, 23), Err(Invalid::Length { .. })));
        assert!(matches!(with(3, 25), Err(Invalid::Length { .. })));
        assert_eq!(with(2, 0), Err(Invalid::ZeroDetectMult));
        assert_eq!(with(1, 0x81), Err(Invalid::Multipoint));
        let mut b = good;
        b[4..8].copy_from_slice(&[0; 4]);
        assert_eq!(Control::decode(&b), Err(Invalid::ZeroMyDiscriminator));
        let mut long = good.to_vec();
        long.extend_from_slice(&[1, 4, 0, 0]);
        long[1] |= 0x04;
        long[3] = 28;
        assert_eq!(Control::decode(&long), Err(Invalid::Authenticated));
        // Trailing bytes past the length field are allowed (the field says what counts).
        let mut padded = good.to_vec();
        padded.push(0);
        assert_eq!(Control::decode(&padded), Ok(sample()));
    }

    proptest::proptest! {
        #[test]
        fn any_datagram_decodes_or_is_refused_and_what_decodes_round_trips(
            b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)
        ) {
            if let Ok(c) = Control::decode(&b) {
                proptest::prop_assert_eq!(Control::decode(&c.encode()), Ok(c));
            }
        }
    }
}

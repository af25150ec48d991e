//! nf_tables edge: read and replace the one NAT table a relay owns, over netlink (the image
//! has no `nft` binary). Message types come from `netlink-packet-netfilter`; this module only
//! builds the table, chain and rules, sends them as one atomic batch, and reads them back.
//!
//! Ownership: the table `ip appliance` carries the comment "owned by appliance" (nft's table
//! comment, a userdata TLV), and each rule carries its meaning as its comment
//! (`appliance: ip saddr … masquerade`), so `nft list ruleset` shows what each rule is for and
//! observing reads the rule back from its comment and then checks that its expressions are
//! exactly the ones that comment stands for. A table of that name without the comment is
//! someone else's: reported, never touched. Nothing outside the table is read or written.

use crate::intent::state::{NatRule, NatTable, NAT_COMMENT, NAT_TABLE};
use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_netfilter::nftables::{
    Bitwise, ChainAttribute, ChainMessage, Cmp, DataAttribute, ExpressionAttribute, Expressions,
    Hook, HookNumber, InetHookNumber, ListAttribute, Meta, MetaKey, NfTablesMessage, Operator,
    Payload, Register, RuleAttribute, RuleMessage, TableAttribute, TableMessage,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
use std::io;
use std::time::Duration;

const CHAIN: &str = "postrouting";
/// NF_IP_PRI_NAT_SRC.
const SRCNAT: u32 = 100;
/// The bitwise expression's boolean operation, (reg & mask) ^ xor (NFT_BITWISE_BOOL, 5.6+).
const NFT_BITWISE_BOOL: u32 = 0;
/// nftnl's userdata TLV type for a table or rule comment.
const UDATA_COMMENT: u8 = 0;
const RULE_PREFIX: &str = "appliance: ";
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// payload bases (enum nft_payload_bases).
const NETWORK_HEADER: u32 = 1;
const TRANSPORT_HEADER: u32 = 2;
const UDP: u8 = 17;

/// What the host holds under our table name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// Our table and the rules we could read back (a rule of ours that does not parse, or a
    /// rule without our comment, makes the table differ from any desired one).
    pub ours: Option<NatTable>,
    /// A table with our name that is not ours.
    pub foreign: bool,
}

fn comment(text: &str) -> Vec<u8> {
    let mut v = vec![UDATA_COMMENT, (text.len() + 1) as u8];
    v.extend_from_slice(text.as_bytes());
    v.push(0);
    v
}

/// The comment TLV in a userdata blob, if any.
fn read_comment(udata: &[u8]) -> Option<String> {
    let mut rest = udata;
    while rest.len() >= 2 {
        let (kind, len) = (rest[0], rest[1] as usize);
        let value = rest.get(2..2 + len)?;
        if kind == UDATA_COMMENT {
            let text = value.strip_suffix(&[0]).unwrap_or(value);
            return std::str::from_utf8(text).ok().map(str::to_string);
        }
        rest = &rest[2 + len..];
    }
    None
}

/// Parse a rule comment written by [`rule_message`] back into the rule.
fn parse_rule(text: &str) -> Option<NatRule> {
    let t = text.strip_prefix(RULE_PREFIX)?;
    let w: Vec<&str> = t.split_whitespace().collect();
    let (from, rest) = match w.as_slice() {
        ["ip", "saddr", net, rest @ ..] => (Some(net.parse().ok()?), rest),
        rest => (None, rest),
    };
    match rest {
        ["ip", "daddr", to, "udp", "dport", ports, "masquerade"] => {
            let (a, b) = ports.split_once('-')?;
            Some(NatRule {
                from,
                to: to.parse().ok()?,
                ports: (a.parse().ok()?, b.parse().ok()?),
            })
        }
        _ => None,
    }
}

fn expr(e: Expressions) -> ListAttribute<ExpressionAttribute> {
    e.into()
}

fn load_payload(base: u32, offset: u32, len: u32) -> ListAttribute<ExpressionAttribute> {
    expr(Expressions::Payload(vec![
        Payload::DestinationRegister(Register::Reg1),
        Payload::Base(base),
        Payload::Offset(offset),
        Payload::Len(len),
    ]))
}

fn compare(op: Operator, value: &[u8]) -> ListAttribute<ExpressionAttribute> {
    expr(Expressions::Cmp(vec![
        Cmp::SourceRegister(Register::Reg1),
        Cmp::Op(op),
        Cmp::Data(DataAttribute::Value(value.to_vec())),
    ]))
}

/// The expressions of `r`: meta l4proto udp, [ip saddr & mask == net], ip daddr == to,
/// udp dport >= first, udp dport <= last, masquerade. Written as the kernel dumps them
/// (attribute order, the bitwise operation made explicit), so a rule read back compares equal
/// to these exactly and an edited one does not.
fn expressions(r: &NatRule) -> Vec<ListAttribute<ExpressionAttribute>> {
    let mut v = vec![
        expr(Expressions::Meta(vec![
            Meta::Key(MetaKey::L4Proto),
            Meta::DestinationRegister(Register::Reg1),
        ])),
        compare(Operator::Equal, &[UDP]),
    ];
    if let Some(from) = r.from {
        v.push(load_payload(NETWORK_HEADER, 12, 4));
        v.push(expr(Expressions::Bitwise(vec![
            Bitwise::SourceRegister(Register::Reg1),
            Bitwise::DestinationRegister(Register::Reg1),
            Bitwise::Length(4),
            Bitwise::Op(NFT_BITWISE_BOOL),
            Bitwise::Mask(DataAttribute::Value(from.netmask().octets().to_vec())),
            Bitwise::Xor(DataAttribute::Value(vec![0; 4])),
        ])));
        v.push(compare(Operator::Equal, &from.network().octets()));
    }
    v.push(load_payload(NETWORK_HEADER, 16, 4));
    v.push(compare(Operator::Equal, &r.to.octets()));
    v.push(load_payload(TRANSPORT_HEADER, 2, 2));
    v.push(compare(
        Operator::GreatherThanEqual,
        &r.ports.0.to_be_bytes(),
    ));
    v.push(compare(Operator::LessThanEqual, &r.ports.1.to_be_bytes()));
    v.push(expr(Expressions::Other {
        expression_type: "masq".into(),
        attributes: vec![],
    }));
    v
}

fn message(inner: NfTablesMessage, flags: u16) -> NetlinkMessage<NetfilterMessage> {
    let mut m = NetlinkMessage::from(NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
        inner,
    ));
    m.header.flags = NLM_F_REQUEST | flags;
    m
}

fn control(inner: ControlMessage) -> NetlinkMessage<NetfilterMessage> {
    let mut m = NetlinkMessage::from(NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES),
        inner,
    ));
    m.header.flags = NLM_F_REQUEST;
    m
}

fn table(with_comment: bool) -> TableMessage {
    let mut attributes = vec![TableAttribute::Name(NAT_TABLE.into())];
    if with_comment {
        attributes.push(TableAttribute::UserData(comment(NAT_COMMENT)));
    }
    TableMessage { attributes }
}

fn rule_message(r: &NatRule) -> RuleMessage {
    RuleMessage {
        attributes: vec![
            RuleAttribute::Table(NAT_TABLE.into()),
            RuleAttribute::Chain(CHAIN.into()),
            RuleAttribute::Expressions(expressions(r)),
            RuleAttribute::UserData(comment(&format!("{RULE_PREFIX}{r}"))),
        ],
    }
}

/// The batch that makes our table exactly `want` (None: absent). Creating the table first
/// makes the delete that follows valid whether or not it existed; the kernel applies the
/// whole batch or nothing.
fn batch(want: Option<&NatTable>) -> Vec<NetlinkMessage<NetfilterMessage>> {
    let mut v = vec![
        control(ControlMessage::BatchBegin),
        message(
            NfTablesMessage::NewTable(table(true)),
            NLM_F_CREATE | NLM_F_ACK,
        ),
        message(NfTablesMessage::DeleteTable(table(false)), NLM_F_ACK),
    ];
    if let Some(t) = want {
        v.push(message(
            NfTablesMessage::NewTable(table(true)),
            NLM_F_CREATE | NLM_F_ACK,
        ));
        v.push(message(
            NfTablesMessage::NewChain(ChainMessage {
                attributes: vec![
                    ChainAttribute::Table(NAT_TABLE.into()),
                    ChainAttribute::Name(CHAIN.into()),
                    ChainAttribute::Hook(vec![
                        Hook::Number(HookNumber::Inet(InetHookNumber::PostRouting)),
                        Hook::Priority(SRCNAT),
                    ]),
                    ChainAttribute::Type("nat".into()),
                ],
            }),
            NLM_F_CREATE | NLM_F_ACK,
        ));
        for r in &t.rules {
            v.push(message(
                NfTablesMessage::NewRule(rule_message(r)),
                NLM_F_CREATE | netlink_packet_core::NLM_F_APPEND | NLM_F_ACK,
            ));
        }
    }
    v.push(control(ControlMessage::BatchEnd));
    v
}

struct Conn {
    socket: Socket,
    seq: u32,
}

impl Conn {
    fn open() -> io::Result<Conn> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // A kernel that never answers must not hang a reconcile.
        let fd = std::os::fd::AsFd::as_fd(&socket);
        nix::sys::socket::setsockopt(
            &fd,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::from(libc::timeval {
                tv_sec: Duration::from_secs(5).as_secs() as libc::time_t,
                tv_usec: 0,
            }),
        )
        .map_err(io::Error::from)?;
        Ok(Conn { socket, seq: 1 })
    }

    /// Send `msgs` in one datagram; returns the sequence numbers that asked for an answer.
    fn send(&mut self, msgs: &mut [NetlinkMessage<NetfilterMessage>]) -> io::Result<Vec<u32>> {
        let mut buf = Vec::new();
        let mut want = Vec::new();
        for m in msgs.iter_mut() {
            m.header.sequence_number = self.seq;
            if m.header.flags & (NLM_F_ACK | NLM_F_DUMP) != 0 {
                want.push(self.seq);
            }
            self.seq += 1;
            m.finalize();
            let start = buf.len();
            buf.resize(start + m.buffer_len(), 0);
            m.serialize(&mut buf[start..]);
        }
        self.socket.send(&buf, 0)?;
        Ok(want)
    }

    /// Read answers until every sequence in `want` is acknowledged (or its dump is done);
    /// returns the messages of dumps. The first kernel error is returned.
    fn answers(&mut self, mut want: Vec<u32>) -> io::Result<Vec<NfTablesMessage>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        while !want.is_empty() {
            let n = self.socket.recv(&mut &mut buf[..], 0)?;
            let mut at = 0;
            while at < n {
                let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&buf[at..n])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    break;
                }
                at += (len + 3) & !3;
                let seq = msg.header.sequence_number;
                match msg.payload {
                    NetlinkPayload::Error(e) => {
                        if let Some(code) = e.code {
                            return Err(io::Error::from_raw_os_error(-code.get()));
                        }
                        want.retain(|s| *s != seq);
                    }
                    NetlinkPayload::Done(_) => want.retain(|s| *s != seq),
                    NetlinkPayload::InnerMessage(NetfilterMessage {
                        inner: NetfilterMessageInner::NfTables(m),
                        ..
                    }) => out.push(m),
                    _ => {}
                }
            }
        }
        Ok(out)
    }
}

/// Make our table exactly `want` (None: remove it), atomically. The name is checked again
/// right before the batch, so a table of that name someone created since the plan is
/// refused, never replaced.
pub fn replace(want: Option<&NatTable>) -> io::Result<()> {
    if observe()?.foreign {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("the nf_tables table `ip {NAT_TABLE}` is not appliance's: not touched"),
        ));
    }
    let mut c = Conn::open()?;
    let mut msgs = batch(want);
    let seqs = c.send(&mut msgs)?;
    c.answers(seqs).map(|_| ())
}

/// Read our table, if any, and whether a foreign one holds its name.
pub fn observe() -> io::Result<Observed> {
    let mut c = Conn::open()?;
    let mut get = [message(
        NfTablesMessage::GetTable(TableMessage { attributes: vec![] }),
        NLM_F_DUMP,
    )];
    let seqs = c.send(&mut get)?;
    let mut ours = false;
    let mut foreign = false;
    for m in c.answers(seqs)? {
        let NfTablesMessage::NewTable(t) = m else {
            continue;
        };
        let name = t.attributes.iter().find_map(|a| match a {
            TableAttribute::Name(n) => Some(n.as_str()),
            _ => None,
        });
        if name != Some(NAT_TABLE) {
            continue;
        }
        let marked = t.attributes.iter().any(|a| {
            matches!(a, TableAttribute::UserData(u) if read_comment(u).as_deref() == Some(NAT_COMMENT))
        });
        if marked {
            ours = true;
        } else {
            foreign = true;
        }
    }
    if !ours {
        return Ok(Observed {
            ours: None,
            foreign,
        });
    }
    let mut get = [message(
        NfTablesMessage::GetRule(RuleMessage {
            attributes: vec![RuleAttribute::Table(NAT_TABLE.into())],
        }),
        NLM_F_DUMP,
    )];
    let seqs = c.send(&mut get)?;
    let mut rules = Vec::new();
    let mut unknown = 0;
    for m in c.answers(seqs)? {
        let NfTablesMessage::NewRule(r) = m else {
            continue;
        };
        let table = r.attributes.iter().find_map(|a| match a {
            RuleAttribute::Table(t) => Some(t.as_str()),
            _ => None,
        });
        if table != Some(NAT_TABLE) {
            continue;
        }
        let parsed = r.attributes.iter().find_map(|a| match a {
            RuleAttribute::UserData(u) => read_comment(u).and_then(|c| parse_rule(&c)),
            _ => None,
        });
        // The comment names the rule; the expressions must still be the ones we wrote for it
        // (a rule edited in place, `nft replace rule ... comment "appliance: ..."`, is not ours).
        let exprs = r.attributes.iter().find_map(|a| match a {
            RuleAttribute::Expressions(e) => Some(e),
            _ => None,
        });
        let parsed = parsed.filter(|rule| exprs == Some(&expressions(rule)));
        match parsed {
            Some(rule) => rules.push(rule),
            None => unknown += 1,
        }
    }
    if unknown > 0 {
        // A rule we did not write (or one edited since) sits in our table: the table differs
        // from anything we want, so a reconcile replaces it.
        rules.push(NatRule {
            from: None,
            to: std::net::Ipv4Addr::UNSPECIFIED,
            ports: (0, 0),
        });
    }
    Ok(Observed {
        ours: Some(NatTable { rules }),
        foreign,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_reads_back_from_its_comment() {
        for r in [
            NatRule {
                from: Some("172.31.0.0/24".parse().unwrap()),
                to: "192.0.2.1".parse().unwrap(),
                ports: (51820, 51823),
            },
            NatRule {
                from: None,
                to: "192.0.2.3".parse().unwrap(),
                ports: (51820, 51820),
            },
        ] {
            let udata = comment(&format!("{RULE_PREFIX}{r}"));
            assert_eq!(parse_rule(&read_comment(&udata).unwrap()), Some(r));
        }
        assert_eq!(
            parse_rule("appliance: ip daddr 1.2.3.4 tcp dport 1-2 masquerade"),
            None
        );
        assert_eq!(parse_rule("someone else's rule"), None);
        assert_eq!(
            read_comment(&[0, 200, 1]),
            None,
            "a truncated TLV is not a comment"
        );
    }

    #[test]
    fn the_batch_replaces_the_table_atomically() {
        let t = NatTable {
            rules: vec![NatRule {
                from: None,
                to: "192.0.2.1".parse().unwrap(),
                ports: (51820, 51823),
            }],
        };
        let b = batch(Some(&t));
        assert!(matches!(
            b.first().map(|m| &m.payload),
            Some(NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::None(ControlMessage::BatchBegin),
                ..
            }))
        ));
        assert!(matches!(
            b.last().map(|m| &m.payload),
            Some(NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::None(ControlMessage::BatchEnd),
                ..
            }))
        ));
        // begin, new table, delete table, new table, chain, one rule, end
        assert_eq!(b.len(), 7);
        assert_eq!(batch(None).len(), 4, "removal: begin, new, delete, end");
    }
}

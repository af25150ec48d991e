//! The `workload { ... }` block of a `node` or `pool`: KDL → [`Workload`], every problem a
//! positioned diagnostic (collected, never the first one only).

use super::{span_of, type_name, Loader, Span};
use crate::model::diag::Diagnostic;
use crate::model::workload::{
    check_path, ImageRef, NfsMount, NfsVersion, Source, Workload, DEFAULT_CPU_WEIGHT,
    DEFAULT_PIDS_MAX, DEFAULT_STOP_TIMEOUT_S, MAX_NCONNECT,
};
use kdl::{KdlNode, KdlValue};
use std::net::IpAddr;

pub(super) const WORKLOAD: &[&str] = &[
    "image",
    "command",
    "args",
    "env",
    "hostname",
    "drain-command",
    "stop-timeout-s",
    "cpu-weight",
    "memory-max-mib",
    "pids-max",
    "mount",
];
const MOUNT: &[&str] = &["vers", "nconnect", "soft", "read-only"];

/// An address the node must reach through the tunnels (checked against the site prefixes
/// once the whole file is read).
pub(super) struct Reach {
    pub address: IpAddr,
    pub span: Span,
    pub what: &'static str,
}

impl Loader<'_> {
    pub(super) fn workload(&mut self, node: &KdlNode) -> Option<Workload> {
        if let Some(e) = node.entries().first() {
            self.err(
                Diagnostic::new((e.span().offset(), e.span().len()), "`workload` takes no arguments")
                    .label("unexpected")
                    .help("write the settings inside: `workload { image \"ADDRESS:PORT/NAME@sha256:…\" }`"),
            );
        }
        let f = self.fields(node, WORKLOAD);
        let image = self.required(&f, "image").and_then(|n| self.image(n));
        let command = self.opt_argv(f.by_name.get("command").and_then(|v| v.first()).copied());
        let args = self.opt_argv(f.by_name.get("args").and_then(|v| v.first()).copied());
        let drain_command = self.opt_argv(
            f.by_name
                .get("drain-command")
                .and_then(|v| v.first())
                .copied(),
        );
        let mut env: Vec<(String, String)> = Vec::new();
        for e in f.by_name.get("env").cloned().unwrap_or_default() {
            if let Some(kv) = self.env(e) {
                if env.iter().any(|(k, _)| *k == kv.0) {
                    self.err(
                        Diagnostic::new(span_of(e), format!("`env` {:?} set twice", kv.0))
                            .label("second value")
                            .help("each variable takes one value; remove one line"),
                    );
                    continue;
                }
                env.push(kv);
            }
        }
        let hostname = match f.by_name.get("hostname").and_then(|v| v.first()) {
            None => None,
            Some(n) => match self.string(n) {
                Some((s, span)) => {
                    if s.is_empty()
                        || s.len() > 64
                        || !s
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'))
                    {
                        self.err(
                            Diagnostic::new(span, format!("invalid host name {s:?}"))
                                .label("not a host name")
                                .help("1 to 64 letters, digits, '-' and '.'"),
                        );
                    }
                    Some(s.to_string())
                }
                None => None,
            },
        };
        let stop = self.opt_int(
            &f,
            "stop-timeout-s",
            DEFAULT_STOP_TIMEOUT_S as i128,
            (1, 86400),
            "seconds between SIGTERM and SIGKILL when the workload stops",
        );
        let cpu_weight = self.opt_int(
            &f,
            "cpu-weight",
            DEFAULT_CPU_WEIGHT as i128,
            (1, 500),
            "cgroup v2 cpu.weight; the daemon has 1000, so keep the workload well below it",
        );
        let memory = match f.by_name.get("memory-max-mib").and_then(|v| v.first()) {
            None => Some(None),
            Some(n) => self
                .int(n, 64, 16 << 20, "MiB the workload may use; leave it out for the node's memory less what the daemon and the kernel keep")
                .map(|v| Some(v as u64)),
        };
        let pids = self.opt_int(
            &f,
            "pids-max",
            DEFAULT_PIDS_MAX as i128,
            (16, 4_194_304),
            "processes and threads the workload may hold at once",
        );
        let mut mounts: Vec<NfsMount> = Vec::new();
        let mut mount_spans: Vec<Span> = Vec::new();
        for m in f.by_name.get("mount").cloned().unwrap_or_default() {
            if let Some(mount) = self.mount(m) {
                if let Some(i) = mounts.iter().position(|x| x.path == mount.path) {
                    let (line, col) = crate::model::diag::line_col(self.source, mount_spans[i].0);
                    self.err(
                        Diagnostic::new(span_of(m), format!("two mounts at {}", mount.path))
                            .label("second mount here")
                            .help(format!("the first is at line {line}, column {col}")),
                    );
                    continue;
                }
                mount_spans.push(span_of(m));
                mounts.push(mount);
            }
        }
        Some(Workload {
            image: image?,
            command: command?,
            args: args?,
            env,
            hostname,
            drain_command: drain_command?,
            stop_timeout_s: stop? as u32,
            cpu_weight: cpu_weight? as u32,
            memory_max_mib: memory?,
            pids_max: pids? as u32,
            mounts,
        })
    }

    fn image(&mut self, field: &KdlNode) -> Option<ImageRef> {
        let (s, span) = self.string(field)?;
        match ImageRef::parse(s) {
            Ok(r) => {
                if let Source::Registry { address, .. } = r.source {
                    self.reach.push(Reach {
                        address,
                        span,
                        what: "the registry",
                    });
                }
                Some(r)
            }
            Err(e) => {
                self.err(
                    Diagnostic::new(span, format!("`image`: {}", e.message))
                        .label("refused")
                        .help(e.help),
                );
                None
            }
        }
    }

    /// A command line: one or more strings (`command "/bin/sh" "-c" "…"`). Outer None: an
    /// error was reported.
    fn opt_argv(&mut self, field: Option<&KdlNode>) -> Option<Option<Vec<String>>> {
        let Some(field) = field else {
            return Some(None);
        };
        let name = field.name().value();
        if field.children().is_some() {
            self.err(
                Diagnostic::new(
                    span_of(field),
                    format!("`{name}` takes strings, not a block"),
                )
                .label("unexpected children"),
            );
            return None;
        }
        if field.entries().is_empty() {
            self.err(
                Diagnostic::new(span_of(field), format!("`{name}` needs a program"))
                    .label("empty")
                    .help(format!("write `{name} \"/path/to/program\" \"ARG\" …`")),
            );
            return None;
        }
        let mut argv = Vec::new();
        let mut ok = true;
        for e in field.entries() {
            let span = (e.span().offset(), e.span().len());
            match (e.name(), e.value()) {
                (None, KdlValue::String(s)) if !s.contains('\0') => argv.push(s.clone()),
                (None, KdlValue::String(_)) => {
                    self.err(Diagnostic::new(span, "an argument holds a NUL byte").label("here"));
                    ok = false;
                }
                (Some(p), _) => {
                    self.err(
                        Diagnostic::new(span, format!("`{name}` takes no properties"))
                            .label(format!("property `{}`", p.value()))
                            .help("quote the whole argument: `\"--opt=value\"`"),
                    );
                    ok = false;
                }
                (None, other) => {
                    self.err(
                        Diagnostic::new(span, format!("`{name}` arguments must be strings"))
                            .label(format!("found {}", type_name(other)))
                            .help("quote every argument"),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(Some(argv))
    }

    fn env(&mut self, field: &KdlNode) -> Option<(String, String)> {
        let e = field.entries();
        let shape =
            e.len() == 2 && e.iter().all(|x| x.name().is_none()) && field.children().is_none();
        let strings = shape
            .then(|| match (e[0].value(), e[1].value()) {
                (KdlValue::String(k), KdlValue::String(v)) => Some((k.clone(), v.clone())),
                _ => None,
            })
            .flatten();
        let Some((k, v)) = strings else {
            self.err(
                Diagnostic::new(span_of(field), "`env` takes a name and a value")
                    .label("malformed")
                    .help("write `env \"NAME\" \"VALUE\"`"),
            );
            return None;
        };
        let span = (e[0].span().offset(), e[0].span().len());
        let valid = !k.is_empty()
            && !k.as_bytes()[0].is_ascii_digit()
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            self.err(
                Diagnostic::new(span, format!("{k:?} is not an environment variable name"))
                    .label("invalid name")
                    .help("letters, digits and '_', not starting with a digit"),
            );
            return None;
        }
        if v.contains('\0') {
            self.err(Diagnostic::new(span, "the value holds a NUL byte").label("here"));
            return None;
        }
        Some((k, v))
    }

    /// `mount "SERVER:/EXPORT" "/PATH" { vers "4.1"; nconnect 4; soft #true; read-only #true }`
    fn mount(&mut self, field: &KdlNode) -> Option<NfsMount> {
        let e = field.entries();
        let shape = e.len() == 2 && e.iter().all(|x| x.name().is_none());
        let strings = shape
            .then(|| match (e[0].value(), e[1].value()) {
                (KdlValue::String(a), KdlValue::String(b)) => Some((a.as_str(), b.as_str())),
                _ => None,
            })
            .flatten();
        let Some((device, path)) = strings else {
            self.err(
                Diagnostic::new(
                    span_of(field),
                    "`mount` takes the export and the path it appears at",
                )
                .label("malformed")
                .help("write `mount \"10.10.0.5:/export/data\" \"/data\" { vers \"4.1\" }`"),
            );
            return None;
        };
        let dev_span = (e[0].span().offset(), e[0].span().len());
        let path_span = (e[1].span().offset(), e[1].span().len());
        let server_export = device.rsplit_once(":/").and_then(|(host, export)| {
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            Some((host.parse::<IpAddr>().ok()?, format!("/{export}")))
        });
        let mut ok = true;
        let (server, export) = match server_export {
            Some((server, export)) if check_export(&export) => (Some(server), export),
            _ => {
                self.err(
                    Diagnostic::new(dev_span, format!("{device:?} is not SERVER:/EXPORT"))
                        .label("not an NFS export")
                        .help("write the server's IP address (the node resolves no names) and the exported path: \"10.10.0.5:/export/data\""),
                );
                ok = false;
                (None, String::new())
            }
        };
        if let Err(why) = check_path(path) {
            self.err(
                Diagnostic::new(path_span, format!("mount path {path:?}: {why}"))
                    .label("not usable")
                    .help("write the absolute path the site's jobs use, such as \"/data\""),
            );
            ok = false;
        }
        let f = self.fields(field, MOUNT);
        let vers = match f.by_name.get("vers").and_then(|v| v.first()) {
            None => Some(NfsVersion::V41),
            Some(n) => {
                let v = match self.arg(n) {
                    Some((KdlValue::String(s), span)) => Some((s.clone(), span)),
                    Some((KdlValue::Integer(i), span)) => Some((i.to_string(), span)),
                    Some((KdlValue::Float(x), span)) => Some((x.to_string(), span)),
                    Some((other, span)) => {
                        self.err(
                            Diagnostic::new(span, "`vers` must be a string")
                                .label(format!("found {}", type_name(other))),
                        );
                        None
                    }
                    None => None,
                };
                v.and_then(|(s, span)| {
                    NfsVersion::parse(&s).or_else(|| {
                        self.err(
                            Diagnostic::new(span, format!("NFS version {s:?} is not supported"))
                                .label("unknown version")
                                .help("write \"3\", \"4.0\", \"4.1\" or \"4.2\""),
                        );
                        None
                    })
                })
            }
        };
        let nconnect = match f.by_name.get("nconnect").and_then(|v| v.first()) {
            None => Some(None),
            Some(n) => {
                let v = self.int(n, 1, MAX_NCONNECT as i128, "TCP connections per mount (the kernel allows 16); leave it out for one per link");
                if let (Some(_), Some(NfsVersion::V40)) = (v, vers) {
                    self.err(
                        Diagnostic::new(span_of(n), "NFSv4.0 opens a single connection")
                            .label("nconnect needs NFSv3 or NFSv4.1+")
                            .help(
                                "write `vers \"4.1\"` (or 4.2) to spread one mount over the links",
                            ),
                    );
                }
                v.map(|v| Some(v as u32))
            }
        };
        let soft = match f.by_name.get("soft").and_then(|v| v.first()) {
            None => Some(false),
            Some(n) => self.boolean(n),
        };
        let read_only = match f.by_name.get("read-only").and_then(|v| v.first()) {
            None => Some(false),
            Some(n) => self.boolean(n),
        };
        let server = server?;
        self.reach.push(Reach {
            address: server,
            span: dev_span,
            what: "the NFS server",
        });
        if !ok {
            return None;
        }
        Some(NfsMount {
            server,
            export,
            path: path.to_string(),
            vers: vers?,
            nconnect: nconnect?,
            soft: soft?,
            read_only: read_only?,
        })
    }
}

/// An export path: absolute, no NUL or ',' (mount(2) option syntax), at most 1024 bytes.
fn check_export(p: &str) -> bool {
    p.starts_with('/') && p.len() <= 1024 && !p.bytes().any(|b| b == 0 || b == b',')
}

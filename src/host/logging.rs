//! Logging: journald when its socket exists, else stderr. Level from $APPLIANCE_LOG
//! (tracing-subscriber filter syntax), default `warn` for one-shot commands. Colours only on a
//! terminal, and never with $NO_COLOR set (the image's init sets it: its console is a log).

use std::io::IsTerminal;
use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

const JOURNALD_SOCKET: &str = "/run/systemd/journal/socket";

/// One-shot commands print their own results and errors; their log goes to journald (an audit
/// trail of every change applied) or, on stderr, only when $APPLIANCE_LOG asks for it.
pub fn init() {
    init_with_defaults("info", "off");
}

pub fn init_with_defaults(journald_default: &str, stderr_default: &str) {
    let journald_present = std::path::Path::new(JOURNALD_SOCKET).exists();
    let default = if journald_present {
        journald_default
    } else {
        stderr_default
    };
    let filter =
        EnvFilter::try_from_env("APPLIANCE_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let registry = tracing_subscriber::registry().with(filter);
    // tracing-journald's layer() fails when the socket is missing: fall back to stderr.
    let journald = journald_present
        .then(tracing_journald::layer)
        .and_then(Result::ok);
    let _ = match journald {
        Some(j) => registry.with(j).try_init(),
        None => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_target(false)
                    .with_ansi(
                        std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
                    ),
            )
            .try_init(),
    };
}

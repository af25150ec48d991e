//! observe → diff → plan → apply → re-observe and verify → revert on failure.
//!
//! The only place that sequences kernel changes. A plan is applied change by change; if one
//! fails, if the result does not verify, or if SIGINT/SIGTERM arrives mid-way, the changes made
//! so far are undone from the plan's own before/after values, and every undo error is
//! collected (not just the first). One reconcile at a time per network namespace (flock): a
//! one-shot `reconcile` takes the lock for its apply, the daemon holds it for its whole life
//! ([`Lock`]).
//!
//! The daemon also applies small plans between two intents ([`apply_steps_only`]): a link
//! flip or a learned route re-points a few routes with one netlink request each, without the
//! two full dumps of observe-and-verify; its periodic full reconcile repairs any drift.

use crate::host::netlink::{Netlink, NetlinkError};
use crate::intent::plan::{diff, Change, Conflict, Item, Op, Plan};
use crate::intent::state::HostState;
use crate::intent::{one_shot, HostError};
use crate::model::config::{Config, Role};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Conflict(#[from] Conflict),
    #[error("reading the host state failed: {0}")]
    Observe(NetlinkError),
    #[error("cannot take the reconcile lock {path}: {error}{}", if matches!(error.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM)) { " (changing the host needs root or CAP_NET_ADMIN; `--dry-run` works without)" } else { "" })]
    Locked { path: String, error: std::io::Error },
    #[error(
        "could not apply `{line}`: {error}{hint}\n{}",
        revert_report(reverted, revert_errors)
    )]
    Apply {
        line: String,
        error: NetlinkError,
        hint: String,
        reverted: usize,
        revert_errors: Vec<String>,
    },
    #[error("the host did not verify after applying; still different:\n{}\n{}", remaining.join("\n"), revert_report(reverted, revert_errors))]
    Verify {
        remaining: Vec<String>,
        reverted: usize,
        revert_errors: Vec<String>,
    },
    #[error(
        "interrupted after {applied} changes\n{}",
        revert_report(reverted, revert_errors)
    )]
    Interrupted {
        applied: usize,
        reverted: usize,
        revert_errors: Vec<String>,
    },
}

fn revert_report(reverted: &usize, errors: &[String]) -> String {
    if errors.is_empty() {
        format!("reverted {reverted} change(s): the host is as it was before")
    } else {
        format!(
            "reverted {reverted} change(s); {} could not be undone:\n  {}",
            errors.len(),
            errors.join("\n  ")
        )
    }
}

/// Compute the plan for `host` against the live kernel state, with every tunnel counted as
/// alive (a one-shot reconcile). Needs no privileges. Returns the desired state too, which
/// [`apply`] verifies against.
pub async fn plan(
    nl: &Netlink,
    cfg: &Config,
    host: &str,
) -> Result<(Plan, HostState), ReconcileError> {
    let i = one_shot(cfg, host, &[])?;
    let have = nl
        .observe(&i.kernel)
        .await
        .map_err(ReconcileError::Observe)?;
    // The underlay networks are an input (a node's import policy, a relay's private
    // network): derive again with the observed ones.
    let underlay: Vec<ipnet::IpNet> = have.underlay.iter().copied().collect();
    let i = one_shot(cfg, host, &underlay)?;
    let plan = diff(host, i.role, &i.kernel, &have)?;
    Ok((plan, i.kernel))
}

/// The plan that takes the host from its current state to `want`.
pub async fn plan_state(
    nl: &Netlink,
    host: &str,
    role: Role,
    want: &HostState,
) -> Result<Plan, ReconcileError> {
    let have = nl.observe(want).await.map_err(ReconcileError::Observe)?;
    Ok(diff(host, role, want, &have)?)
}

/// Apply `plan`, verify that the host is now `want`, and revert on any failure (one-shot
/// reconcile; SIGINT/SIGTERM mid-way reverts). The caller takes the [`lock`] before it
/// plans: a plan read before the lock may be stale once another reconcile has run.
pub async fn apply(
    nl: &Netlink,
    _lock: &Lock,
    want: &HostState,
    plan: &Plan,
) -> Result<(), ReconcileError> {
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return;
            };
            tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
            stop.store(true, Ordering::SeqCst);
        })
    };
    let result = apply_steps(nl, want, plan, &stop).await;
    watcher.abort();
    result
}

/// [`apply`] under a lock the caller holds (the daemon): no signal watcher, the daemon's own
/// loop handles signals between plans.
pub async fn apply_held(
    nl: &Netlink,
    _lock: &Lock,
    want: &HostState,
    plan: &Plan,
) -> Result<(), ReconcileError> {
    apply_steps(nl, want, plan, &AtomicBool::new(false)).await
}

/// Apply a plan computed between two intents, change by change, without observing or
/// verifying; on a failure revert what was applied. The caller falls back to a full reconcile
/// on any error.
pub async fn apply_steps_only(
    nl: &Netlink,
    _lock: &Lock,
    plan: &Plan,
) -> Result<(), ReconcileError> {
    steps(nl, plan, &AtomicBool::new(false)).await
}

async fn apply_steps(
    nl: &Netlink,
    want: &HostState,
    plan: &Plan,
    stop: &AtomicBool,
) -> Result<(), ReconcileError> {
    steps(nl, plan, stop).await?;
    verify(nl, want, plan).await
}

async fn steps(nl: &Netlink, plan: &Plan, stop: &AtomicBool) -> Result<(), ReconcileError> {
    for (i, change) in plan.changes.iter().enumerate() {
        if stop.load(Ordering::SeqCst) {
            let (reverted, revert_errors) = undo(nl, &plan.revert(i)).await;
            return Err(ReconcileError::Interrupted {
                applied: i,
                reverted,
                revert_errors,
            });
        }
        if let Err(error) = nl.apply(change).await {
            tracing::error!(change = %change.line(), %error, "apply failed; reverting");
            let hint = hint(change, &error);
            let (reverted, revert_errors) = undo(nl, &plan.revert(i)).await;
            return Err(ReconcileError::Apply {
                line: change.line(),
                error,
                hint,
                reverted,
                revert_errors,
            });
        }
        tracing::info!(change = %change.line(), "applied");
    }
    Ok(())
}

async fn verify(nl: &Netlink, want: &HostState, plan: &Plan) -> Result<(), ReconcileError> {
    let after = plan_state(nl, &plan.host, plan.role, want).await;
    match after {
        Ok(p) if p.is_empty() => Ok(()),
        other => {
            let remaining = match other {
                Ok(p) => p.changes.iter().map(Change::line).collect(),
                Err(e) => vec![e.to_string()],
            };
            let (reverted, revert_errors) = undo(nl, &plan.revert(plan.changes.len())).await;
            Err(ReconcileError::Verify {
                remaining,
                reverted,
                revert_errors,
            })
        }
    }
}

/// Perform undo changes, collecting every failure instead of stopping at the first.
async fn undo(nl: &Netlink, changes: &[Change]) -> (usize, Vec<String>) {
    let mut errors = Vec::new();
    for c in changes {
        if let Err(e) = nl.apply(c).await {
            // Undoing the creation of something the kernel already removed with its device is
            // not a failure: the goal state (absent) holds.
            let gone = c.op == Op::Remove
                && (matches!(e.errno(), Some(libc::ENODEV | libc::ESRCH | libc::ENOENT))
                    || matches!(e, NetlinkError::NoDevice(_)));
            if !gone {
                errors.push(format!("{}: {e}", c.line()));
            }
        }
    }
    (changes.len(), errors)
}

fn hint(change: &Change, error: &NetlinkError) -> String {
    match (&change.after, error.errno()) {
        (Some(Item::Route(r)), Some(libc::EEXIST)) => format!(
            " (a route to {} with metric {} already exists and is not appliance's; appliance does not replace routes it does not own)",
            r.dst, r.metric
        ),
        (_, Some(libc::EPERM)) | (_, Some(libc::EACCES)) => {
            " (changing the host needs root or CAP_NET_ADMIN; `--dry-run` works without)".to_string()
        }
        (Some(Item::Device(_)), Some(libc::ENOENT)) => " (is /dev/net/tun present? load the tun module)".to_string(),
        _ => String::new(),
    }
}

/// 30 s in steps of 100 ms.
const LOCK_WAIT_STEPS: u32 = 300;

/// The reconcile lock of this network namespace, held while it lives.
pub type Lock = nix::fcntl::Flock<std::fs::File>;

/// flock on a per-network-namespace lock file, so two reconciles never interleave.
pub fn lock() -> Result<Lock, Box<ReconcileError>> {
    use std::os::unix::fs::MetadataExt;
    let ns = std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino())
        .unwrap_or(0);
    let dir = std::path::Path::new("/run/appliance");
    let path = dir.join(format!("reconcile-{ns}.lock"));
    let locked = |error: std::io::Error| {
        Box::new(ReconcileError::Locked {
            path: path.display().to_string(),
            error,
        })
    };
    // Root's alone: flock works on any descriptor, so a lock file others may open is one any
    // local user can hold, and the daemon would not start.
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(locked)?;
    }
    let file = {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(locked)?
    };
    {
        use std::os::unix::fs::PermissionsExt as _;
        // One made before this (0644) is narrowed too.
        let _ = file.set_permissions(std::fs::Permissions::from_mode(0o600));
    }
    // Wait a while for a reconcile in progress, not for ever: the holder may be a running
    // daemon, which keeps the lock for its life.
    let mut file = file;
    for _ in 0..LOCK_WAIT_STEPS {
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(l),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                file = f;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err((_, e)) => return Err(locked(std::io::Error::from(e))),
        }
    }
    Err(locked(std::io::Error::new(
        std::io::ErrorKind::WouldBlock,
        "held by another process for 30 s (an appliance daemon holds it while it runs; it reconciles this host itself)",
    )))
}

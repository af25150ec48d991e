//! Apply a layer (a tar stream, plain, gzip or zstd) to a root being built, with OCI
//! whiteouts, hard links and symlinks, never writing outside the root. The decisions about
//! each entry's path are [`super::oci::entry_action`]'s; this is the file system edge.
//!
//! Paths inside the root are resolved the way the workload will see them: a symlink in a
//! parent directory is followed *inside* the root (an absolute target starts at the root, `..`
//! stops there), as `openat2(RESOLVE_IN_ROOT)` would. Only this process writes the staging
//! directory, so resolving component by component is not racy.
//!
//! Ownership: the workload's root user is [`ROOT_HOST_ID`] on the host (its user namespace
//! maps 0 there), so files owned by 0 in the image are owned by that id on disk; other ids
//! keep their numbers (the site's users are the same uids on NFS).

use super::oci::{entry_action, link_target, Compression, EntryAction};
use std::io::{self, BufRead, Read};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};

/// The host uid and gid of the workload's root.
pub const ROOT_HOST_ID: u32 = 100_000;
/// Ids 1..ID_RANGE are the same inside and outside the workload.
pub const ID_RANGE: u32 = 65_536;
/// Most bytes and entries one image may unpack to (a decompression bomb stops here).
pub const UNPACKED_MAX: u64 = 64 << 30;
pub const ENTRIES_MAX: u64 = 4_000_000;

/// The host id of an image's file owner.
pub fn host_id(id: u64) -> u32 {
    match id {
        0 => ROOT_HOST_ID,
        i if i < ID_RANGE as u64 => i as u32,
        _ => 65_534,
    }
}

/// A zstd stream of one or more frames (skippable frames skipped), as one reader.
struct ZstdFrames<R: BufRead> {
    src: R,
    dec: ruzstd::decoding::FrameDecoder,
    active: bool,
}

impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
        let bad =
            |e: FrameDecoderError| io::Error::new(io::ErrorKind::InvalidData, format!("zstd: {e}"));
        loop {
            if !self.active {
                if self.src.fill_buf()?.is_empty() {
                    return Ok(0);
                }
                match self.dec.reset(&mut self.src) {
                    Ok(()) => self.active = true,
                    Err(FrameDecoderError::ReadFrameHeaderError(
                        ReadFrameHeaderError::SkipFrame { length, .. },
                    )) => {
                        let skipped =
                            io::copy(&mut (&mut self.src).take(length as u64), &mut io::sink())?;
                        if skipped != length as u64 {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "zstd: truncated skippable frame",
                            ));
                        }
                        continue;
                    }
                    Err(e) => return Err(bad(e)),
                }
            }
            if self.dec.can_collect() == 0 && !self.dec.is_finished() {
                self.dec
                    .decode_blocks(
                        &mut self.src,
                        ruzstd::decoding::BlockDecodingStrategy::UptoBytes(1 << 20),
                    )
                    .map_err(bad)?;
                continue;
            }
            let n = self.dec.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            if self.dec.is_finished() && self.dec.can_collect() == 0 {
                self.active = false;
            }
        }
    }
}

fn decompressor<'a, R: BufRead + 'a>(r: R, c: Compression) -> Box<dyn Read + 'a> {
    match c {
        Compression::None => Box::new(r),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(r)),
        Compression::Zstd => Box::new(ZstdFrames {
            src: r,
            dec: ruzstd::decoding::FrameDecoder::new(),
            active: false,
        }),
    }
}

/// Counts what a layer unpacks, against [`UNPACKED_MAX`].
struct Counted<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n += k as u64;
        if self.n > UNPACKED_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the layer unpacks to more than {} GiB", UNPACKED_MAX >> 30),
            ));
        }
        Ok(k)
    }
}

/// Resolve `rel` (normalised, relative) inside `root`, following symlinks in every component
/// but the last within the root. Returns the host path of the parent directory and the last
/// component; the parent exists when it returns Ok (missing directories are created, as tar
/// does, owned by the workload's root).
pub fn resolve_parent(root: &Path, rel: &str) -> io::Result<(PathBuf, String)> {
    let (dir, name) = match rel.rsplit_once('/') {
        Some((d, n)) => (d, n),
        None => ("", rel),
    };
    let parent = resolve_dir(root, dir, true)?;
    Ok((parent, name.to_string()))
}

/// A directory inside `root` (created when missing), symlinks followed inside the root: where
/// the runner mounts `/dev`, `/sys`, `/proc` and the NFS paths.
pub fn resolve_dir_in_root(root: &Path, rel: &str) -> io::Result<PathBuf> {
    resolve_dir(root, rel, true)
}

/// Resolve a directory path inside `root` (symlinks followed inside the root); with `create`,
/// missing components become directories.
fn resolve_dir(root: &Path, rel: &str, create: bool) -> io::Result<PathBuf> {
    let mut stack: Vec<String> = Vec::new();
    let mut todo: Vec<String> = rel
        .split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .rev()
        .collect();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        match c.as_str() {
            "." => continue,
            ".." => {
                stack.pop();
                continue;
            }
            _ => {}
        }
        let here: PathBuf = root.join(stack.join("/")).join(&c);
        match std::fs::symlink_metadata(&here) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return Err(io::Error::other(format!("{rel}: too many symlinks")));
                }
                let target = std::fs::read_link(&here)?;
                let t = target.to_string_lossy().into_owned();
                if t.starts_with('/') {
                    stack.clear();
                }
                for part in t.split('/').filter(|p| !p.is_empty()).rev() {
                    todo.push(part.to_string());
                }
            }
            Ok(m) if m.is_dir() => stack.push(c),
            Ok(_) => {
                return Err(io::Error::other(format!(
                    "{rel}: {} is not a directory",
                    stack
                        .iter()
                        .chain([&c])
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("/")
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                std::fs::create_dir(&here)?;
                std::os::unix::fs::lchown(&here, Some(ROOT_HOST_ID), Some(ROOT_HOST_ID))?;
                stack.push(c);
            }
            Err(e) => return Err(e),
        }
    }
    let p = root.join(stack.join("/"));
    debug_assert!(p.components().all(|c| c != Component::ParentDir));
    Ok(p)
}

/// Remove a path (a whole tree for a directory) without following a symlink at its end.
fn remove_any(p: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Apply one layer to `root`.
pub fn apply_layer<R: BufRead>(root: &Path, r: R, c: Compression) -> Result<(), String> {
    let mut archive = tar::Archive::new(Counted {
        inner: decompressor(r, c),
        n: 0,
    });
    archive.set_preserve_permissions(true);
    archive.set_unpack_xattrs(false);
    let mut entries_seen: u64 = 0;
    // Directory modes are set after the layer (a read-only directory would refuse its files).
    let mut dir_modes: Vec<(PathBuf, u32)> = Vec::new();
    for entry in archive.entries().map_err(|e| format!("tar: {e}"))? {
        let mut entry = entry.map_err(|e| format!("tar: {e}"))?;
        entries_seen += 1;
        if entries_seen > ENTRIES_MAX {
            return Err(format!("more than {ENTRIES_MAX} entries"));
        }
        let raw = entry.path_bytes().into_owned();
        let action = entry_action(&raw)?;
        let io = |what: &str, e: io::Error| format!("{what}: {e}");
        match action {
            EntryAction::Skip => continue,
            EntryAction::Remove(p) => {
                let (parent, name) = resolve_parent(root, &p).map_err(|e| io(&p, e))?;
                remove_any(&parent.join(name)).map_err(|e| io(&p, e))?;
            }
            EntryAction::Opaque(d) => {
                let dir = resolve_dir(root, &d, true).map_err(|e| io(&d, e))?;
                for e in std::fs::read_dir(&dir).map_err(|e| io(&d, e))? {
                    let e = e.map_err(|e| io(&d, e))?;
                    remove_any(&e.path()).map_err(|e| io(&d, e))?;
                }
            }
            EntryAction::Put(p) => {
                let kind = entry.header().entry_type();
                let (parent, name) = resolve_parent(root, &p).map_err(|e| io(&p, e))?;
                let target = parent.join(&name);
                let existing = std::fs::symlink_metadata(&target).ok();
                // An empty owner field (some writers leave it blank) is root's.
                let (uid, gid) = (
                    host_id(entry.header().uid().unwrap_or(0)),
                    host_id(entry.header().gid().unwrap_or(0)),
                );
                let mode = entry.header().mode().map_err(|e| io(&p, e))? & 0o7777;
                if kind.is_dir() {
                    match existing {
                        Some(m) if m.is_dir() => {}
                        Some(_) => {
                            remove_any(&target).map_err(|e| io(&p, e))?;
                            std::fs::create_dir(&target).map_err(|e| io(&p, e))?;
                        }
                        None => std::fs::create_dir(&target).map_err(|e| io(&p, e))?,
                    }
                    std::os::unix::fs::lchown(&target, Some(uid), Some(gid))
                        .map_err(|e| io(&p, e))?;
                    dir_modes.push((target, mode));
                    continue;
                }
                if existing.is_some() {
                    remove_any(&target).map_err(|e| io(&p, e))?;
                }
                if kind.is_hard_link() {
                    let link = entry
                        .link_name_bytes()
                        .ok_or_else(|| format!("{p}: hard link without a target"))?;
                    let t = link_target(&link)?;
                    let (tp, tn) = resolve_parent(root, &t).map_err(|e| io(&t, e))?;
                    let src = tp.join(tn);
                    match std::fs::symlink_metadata(&src) {
                        Ok(m) if !m.is_dir() => {}
                        _ => {
                            return Err(format!(
                                "{p}: hard link to {t}, which is not a file of the image"
                            ))
                        }
                    }
                    std::fs::hard_link(&src, &target).map_err(|e| io(&p, e))?;
                    continue;
                }
                if kind.is_symlink() {
                    let link = entry
                        .link_name_bytes()
                        .ok_or_else(|| format!("{p}: symlink without a target"))?;
                    let link = std::str::from_utf8(&link)
                        .map_err(|_| format!("{p}: symlink target is not UTF-8"))?
                        .to_string();
                    std::os::unix::fs::symlink(&link, &target).map_err(|e| io(&p, e))?;
                    std::os::unix::fs::lchown(&target, Some(uid), Some(gid))
                        .map_err(|e| io(&p, e))?;
                    continue;
                }
                if kind.is_file() || kind == tar::EntryType::Continuous {
                    let mut f = std::fs::File::create(&target).map_err(|e| io(&p, e))?;
                    io::copy(&mut entry, &mut f).map_err(|e| io(&p, e))?;
                    drop(f);
                    std::os::unix::fs::lchown(&target, Some(uid), Some(gid))
                        .map_err(|e| io(&p, e))?;
                    // After the chown, which clears set-id bits.
                    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
                        .map_err(|e| io(&p, e))?;
                    continue;
                }
                if kind == tar::EntryType::Fifo {
                    nix::unistd::mkfifo(&target, nix::sys::stat::Mode::from_bits_truncate(mode))
                        .map_err(|e| format!("{p}: {e}"))?;
                    std::os::unix::fs::lchown(&target, Some(uid), Some(gid))
                        .map_err(|e| io(&p, e))?;
                    continue;
                }
                // Device nodes: the workload gets its /dev from the node; tar headers of other
                // kinds (pax, GNU long names) never reach here as entries.
            }
        }
    }
    for (d, mode) in dir_modes.into_iter().rev() {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("{}: {e}", d.display()))?;
    }
    Ok(())
}

/// The root directory itself belongs to the workload's root user.
pub fn shift_root_owner(root: &Path) -> Result<(), String> {
    std::os::unix::fs::lchown(root, Some(ROOT_HOST_ID), Some(ROOT_HOST_ID))
        .map_err(|e| format!("{}: {e}", root.display()))?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{}: {e}", root.display()))
}

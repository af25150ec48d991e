//! An OCI image layout on an attached drive (`image "disk:LABEL@sha256:…"`): find the
//! filesystem by its label (ISO 9660 or FAT, as the seed drives) and mount it read-only.

use crate::image::{sources, sys};
use std::path::Path;

pub fn mount_label(label: &str, at: &Path) -> Result<(), String> {
    let at_s = at.to_string_lossy();
    let mounted = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounted
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(&*at_s))
    {
        return Ok(());
    }
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/block")
        .map_err(|e| format!("/sys/class/block: {e}"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !(n.starts_with("dm-") || n.starts_with("loop") || n.starts_with("ram")))
        .collect();
    names.sort();
    for name in names {
        let dev = format!("/dev/{name}");
        let Ok(head) = sys::read_head(&dev, sources::PROBE_LEN) else {
            continue;
        };
        if let Some((fs, l)) = sources::probe_label(&head) {
            if l == label {
                std::fs::create_dir_all(at).map_err(|e| format!("{at_s}: {e}"))?;
                return sys::mount(
                    &dev,
                    &at_s,
                    fs.kernel_name(),
                    libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    "",
                )
                .map_err(|e| format!("{dev} (label {label}): {e}"));
            }
        }
    }
    Err(format!(
        "no drive with the label {label:?} (ISO 9660 or FAT) is attached"
    ))
}

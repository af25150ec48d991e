//! sysctl reads and writes through /proc/sys (kernel edge). /proc/sys/net follows the network
//! namespace of the calling process.

use std::io;
use std::path::PathBuf;

fn path(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.replace('.', "/"))
}

/// Current value, or None when the key does not exist (e.g. a device not created yet).
pub fn read(key: &str) -> io::Result<Option<String>> {
    match std::fs::read_to_string(path(key)) {
        Ok(v) => Ok(Some(v.trim().to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn write(key: &str, value: &str) -> io::Result<()> {
    std::fs::write(path(key), value)
}

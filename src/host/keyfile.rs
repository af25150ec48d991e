//! The private key on disk: read only from a file that group and others cannot read.

use crate::model::key::{KeyError, PrivateKey};

/// Why a private key file was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read private key file {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error(
        "private key file {path} is readable by others (mode {mode:04o}); run `chmod 600 {path}`"
    )]
    Permissions { path: String, mode: u32 },
    #[error("private key file {path}: {error}")]
    Invalid { path: String, error: KeyError },
}

/// Read a private key file, refusing one that group or others may read.
pub fn load_private_key(path: &std::path::Path) -> Result<PrivateKey, KeyFileError> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|error| KeyFileError::Read {
        path: shown.clone(),
        error,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions { path: shown, mode });
    }
    let text = std::fs::read_to_string(path).map_err(|error| KeyFileError::Read {
        path: shown.clone(),
        error,
    })?;
    text.parse()
        .map_err(|error| KeyFileError::Invalid { path: shown, error })
}

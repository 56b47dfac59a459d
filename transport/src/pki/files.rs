//! Writing key and certificate files with exact permissions.

use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::PkiError;

/// Mode of key files.
pub(crate) const KEY_MODE: u32 = 0o600;
/// Mode of certificate files.
pub(crate) const CERT_MODE: u32 = 0o644;
/// Mode of directories this module creates.
pub(crate) const DIR_MODE: u32 = 0o755;

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PkiError {
    let path = path.to_path_buf();
    move |source| PkiError::Io { op, path, source }
}

/// Creates `dir` (and missing parents) with mode 0755 unless it exists.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), PkiError> {
    if dir.is_dir() {
        return Ok(());
    }
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(io("create directory", dir))?;
    // The umask may have narrowed the mode; make it exactly 0755.
    fs::set_permissions(dir, Permissions::from_mode(DIR_MODE)).map_err(io("chmod", dir))
}

/// Writes a new file that must not exist yet, with `mode` from its creation on.
pub(crate) fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => PkiError::KeyExists {
                path: path.to_path_buf(),
            },
            _ => PkiError::Io {
                op: "create",
                path: path.to_path_buf(),
                source,
            },
        })?;
    let written = file
        .set_permissions(Permissions::from_mode(mode))
        .and_then(|()| file.write_all(data))
        .and_then(|()| file.sync_all());
    if let Err(source) = written {
        let _ = fs::remove_file(path);
        return Err(PkiError::Io {
            op: "write",
            path: path.to_path_buf(),
            source,
        });
    }
    Ok(())
}

/// Writes `path` atomically (a temporary file with `mode` in the same directory, then a
/// rename), replacing any existing file: a reader never sees half a file, and an existing
/// file's looser mode is not inherited.
pub(crate) fn write_replace(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp: PathBuf = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    write_new(&tmp, data, mode).map_err(|e| match e {
        PkiError::KeyExists { path } => PkiError::Io {
            op: "create",
            path,
            source: std::io::ErrorKind::AlreadyExists.into(),
        },
        e => e,
    })?;
    fs::rename(&tmp, path).map_err(|source| {
        let _ = fs::remove_file(&tmp);
        PkiError::Io {
            op: "write",
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Reads a text file.
pub(crate) fn read(path: &Path) -> Result<String, PkiError> {
    crate::files::read_text_bounded(path, crate::files::MAX_PEM_BYTES).map_err(io("read", path))
}

/// Reads a key file, refusing it if group or others may read it.
pub(crate) fn read_key(path: &Path) -> Result<String, PkiError> {
    let mode = fs::metadata(path)
        .map_err(io("read", path))?
        .permissions()
        .mode()
        & 0o7777;
    if mode & 0o077 != 0 {
        return Err(PkiError::KeyPermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    read(path)
}

//! Endpoint keys persisted in `state_dir`, so a restarted node answers its old peers' packets
//! with a stateless reset instead of silence.
//!
//! Both keys are needed (docs/protocol.md, "Stateless reset"): the reset key signs the reset
//! token, and the connection-id generator key makes the restarted node recognise the connection
//! ids it issued before the restart as its own. With only the reset key, peers still waited for
//! the full idle timeout.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use quinn_proto::{ConnectionIdGenerator, HashedConnectionIdGenerator};
use rand::RngCore;

const KEY_FILE: &str = "endpoint.key";
const KEY_LEN: usize = 40; // 32 bytes of HMAC key + 8 bytes of connection-id key

/// Errors reading or creating the persisted endpoint keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The state directory could not be created.
    #[error("cannot create state_dir {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The key file exists but could not be read or written.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The key file has the wrong length (corrupt or from another program).
    #[error(
        "{path} is corrupt: expected {KEY_LEN} bytes, found {found}; delete it to start afresh"
    )]
    Corrupt {
        /// The key file.
        path: PathBuf,
        /// Its length.
        found: usize,
    },
}

/// The keys that make stateless resets work across restarts.
#[derive(Clone)]
pub struct EndpointKeys {
    reset: [u8; 32],
    cid: u64,
}

impl EndpointKeys {
    /// Fresh random keys (no persistence; a restart is then noticed only by idle timeout).
    pub fn random() -> EndpointKeys {
        let mut bytes = [0u8; KEY_LEN];
        rand::thread_rng().fill_bytes(&mut bytes);
        Self::from_bytes(&bytes)
    }

    /// Loads the keys from `state_dir`, creating the directory and the key file (mode 0600)
    /// on first start.
    pub fn load_or_create(state_dir: &Path) -> Result<EndpointKeys, KeyError> {
        fs::create_dir_all(state_dir).map_err(|source| KeyError::CreateDir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let path = state_dir.join(KEY_FILE);
        // A key file is exactly KEY_LEN bytes: a longer one (or a device) is refused unread.
        match crate::files::read_bounded(&path, KEY_LEN as u64) {
            Ok(bytes) if bytes.len() == KEY_LEN => return Ok(Self::from_bytes(&bytes)),
            Ok(bytes) => {
                return Err(KeyError::Corrupt {
                    path,
                    found: bytes.len(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(KeyError::Io { path, source }),
        }
        let mut bytes = [0u8; KEY_LEN];
        rand::thread_rng().fill_bytes(&mut bytes);
        // Write to a temporary file and rename, so a crash never leaves a half-written key.
        let tmp = state_dir.join(format!("{KEY_FILE}.tmp"));
        let io = |source| KeyError::Io {
            path: tmp.clone(),
            source,
        };
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).map_err(io)?;
        fs::rename(&tmp, &path).map_err(|source| KeyError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Self::from_bytes(&bytes))
    }

    fn from_bytes(bytes: &[u8]) -> EndpointKeys {
        let mut reset = [0u8; 32];
        reset.copy_from_slice(&bytes[..32]);
        let mut cid = [0u8; 8];
        cid.copy_from_slice(&bytes[32..KEY_LEN]);
        EndpointKeys {
            reset,
            cid: u64::from_le_bytes(cid),
        }
    }

    /// A quinn endpoint configuration using these keys.
    pub fn endpoint_config(&self) -> quinn::EndpointConfig {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.reset);
        let mut cfg = quinn::EndpointConfig::new(Arc::new(key));
        let cid_key = self.cid;
        cfg.cid_generator(move || {
            Box::new(HashedConnectionIdGenerator::from_key(cid_key))
                as Box<dyn ConnectionIdGenerator>
        });
        cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_persist_across_loads_with_private_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = EndpointKeys::load_or_create(dir.path()).expect("create");
        let b = EndpointKeys::load_or_create(dir.path()).expect("load");
        assert_eq!(a.reset, b.reset);
        assert_eq!(a.cid, b.cid);
        let mode = fs::metadata(dir.path().join(KEY_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn corrupt_key_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(KEY_FILE), b"short").expect("write");
        let err = EndpointKeys::load_or_create(dir.path())
            .err()
            .expect("must fail");
        assert!(err.to_string().contains(KEY_FILE), "{err}");
    }
}

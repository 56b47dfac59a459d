//! Exit codes (sysexits) and the one-sentence failure every command ends with.

use std::fmt;

/// Command-line usage error.
pub const USAGE: u8 = 64;
/// A service the command needs is unavailable (no node answers, cannot bind).
pub const UNAVAILABLE: u8 = 69;
/// An internal software error.
pub const SOFTWARE: u8 = 70;
/// An I/O error (cannot write a file).
pub const IO: u8 = 74;
/// The config, or a file it names, is unusable.
pub const CONFIG: u8 = 78;

/// A failed command: what to print and the exit code.
#[derive(Debug)]
pub struct Failure {
    /// sysexits code.
    pub code: u8,
    /// One clear sentence naming what is at fault.
    pub message: String,
}

impl Failure {
    /// A failure with `code`.
    pub fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }

    /// A config failure (exit 78).
    pub fn config(message: impl fmt::Display) -> Failure {
        Failure::new(CONFIG, message.to_string())
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<crate::config::ConfigError> for Failure {
    fn from(e: crate::config::ConfigError) -> Self {
        Failure::config(e)
    }
}

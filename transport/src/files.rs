//! Reading the node's own files (config, certificates, keys, passwords) with a bound: a path
//! naming a device, a FIFO or a directory, or a file far larger than any such file can be, is
//! refused with a reason instead of being read until memory runs out (`/dev/zero` as a CA).

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// The largest certificate, CA bundle or key file read: a CA bundle of every public root is
/// about 200 KiB.
pub const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// Reads `path`, which must be a regular file of at most `max` bytes.
pub fn read_bounded(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let file = File::open(path)?;
    read_open_bounded(file, max)
}

/// [`read_bounded`] for a file already open (whose metadata the caller may have checked).
pub fn read_open_bounded(file: File, max: u64) -> io::Result<Vec<u8>> {
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.len() > max {
        return Err(too_large(meta.len(), max));
    }
    let mut buf = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    // The file may grow between the size check and the read: never read past the bound.
    file.take(max + 1).read_to_end(&mut buf)?;
    let read = u64::try_from(buf.len()).unwrap_or(u64::MAX);
    if read > max {
        return Err(too_large(read, max));
    }
    Ok(buf)
}

/// [`read_bounded`] as UTF-8 text.
pub fn read_text_bounded(path: &Path, max: u64) -> io::Result<String> {
    String::from_utf8(read_bounded(path, max)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
}

fn too_large(len: u64, max: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{len} bytes or more; at most {max} expected"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_within_the_bound_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        std::fs::write(&p, b"hello").expect("write");
        assert_eq!(read_bounded(&p, 5).expect("read"), b"hello");
        assert_eq!(read_text_bounded(&p, 100).expect("read"), "hello");
    }

    #[test]
    fn devices_directories_and_large_files_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = read_bounded(Path::new("/dev/zero"), 1024).expect_err("a device");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let e = read_bounded(dir.path(), 1024).expect_err("a directory");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let p = dir.path().join("big");
        std::fs::write(&p, vec![b'x'; 2048]).expect("write");
        let e = read_bounded(&p, 1024).expect_err("too large");
        assert!(e.to_string().contains("at most 1024"), "{e}");
        std::fs::write(&p, [0xff, 0xfe]).expect("write");
        let e = read_text_bounded(&p, 1024).expect_err("not text");
        assert!(e.to_string().contains("UTF-8"), "{e}");
    }
}

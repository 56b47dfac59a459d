//! A bounds-checked cursor shared by the decoders.
//!
//! Every read answers one of three ways: the bytes, "need more input" (the message is not all
//! here yet), or an error (the message as declared cannot hold the read). Keeping the first two
//! apart in one place is what lets each decoder return `Ok(None)` for every strict prefix of a
//! valid message and an error as soon as the bytes seen cannot start one.

use crate::{DecodeError, VERSION};

/// Why a read stopped short.
#[derive(Debug)]
pub(crate) enum Stop {
    /// The bytes so far are a valid beginning; more input is needed.
    NeedMore,
    /// The bytes so far cannot start a valid message.
    Invalid(DecodeError),
}

impl From<DecodeError> for Stop {
    fn from(err: DecodeError) -> Self {
        Stop::Invalid(err)
    }
}

/// Turns a decoder's internal result into the public `Ok(None)` / `Ok(Some)` / `Err` shape.
pub(crate) fn finish<T>(result: Result<T, Stop>) -> Result<Option<T>, DecodeError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(Stop::NeedMore) => Ok(None),
        Err(Stop::Invalid(err)) => Err(err),
    }
}

/// Checks the 2-byte magic and the version byte, looking only at the bytes already received,
/// so a wrong first byte is rejected before the second arrives.
pub(crate) fn check_prefix(buf: &[u8], magic: [u8; 2]) -> Result<(), Stop> {
    for (i, expected) in magic.into_iter().enumerate() {
        match buf.get(i) {
            None => return Err(Stop::NeedMore),
            Some(&byte) if byte != expected => return Err(DecodeError::BadMagic(byte).into()),
            Some(_) => {}
        }
    }
    match buf.get(2) {
        None => Err(Stop::NeedMore),
        Some(&VERSION) => Ok(()),
        Some(&other) => Err(DecodeError::UnsupportedVersion(other).into()),
    }
}

/// Reads forward through `buf`, which holds the bytes received so far, within a message
/// declared to end at `end` (an offset into `buf`'s frame of reference, possibly past the
/// bytes received). A read that would cross `end` is an error; one that would only cross the
/// end of `buf` asks for more input.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    /// A reader over `buf` whose message is declared to end at offset `end`; pass
    /// `usize::MAX` when the format has no length prefix.
    pub(crate) fn new(buf: &'a [u8], end: usize) -> Self {
        Reader { buf, pos: 0, end }
    }

    /// Offset of the next unread byte.
    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    /// Whether every declared byte has been read.
    pub(crate) fn at_end(&self) -> bool {
        self.pos >= self.end
    }

    /// Moves past `n` bytes without looking at them.
    pub(crate) fn skip(&mut self, n: usize, field: &'static str) -> Result<(), Stop> {
        self.take(n, field).map(drop)
    }

    /// The next `n` bytes; `field` names them in a [`DecodeError::Truncated`].
    pub(crate) fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], Stop> {
        let next = self.pos.saturating_add(n);
        if next > self.end {
            return Err(DecodeError::Truncated { field }.into());
        }
        let bytes = self.buf.get(self.pos..next).ok_or(Stop::NeedMore)?;
        self.pos = next;
        Ok(bytes)
    }

    /// The next byte.
    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, Stop> {
        let bytes = self.take(1, field)?;
        Ok(bytes[0])
    }

    /// The next two bytes as a big-endian integer.
    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, Stop> {
        let bytes = self.take(2, field)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_past_declared_end_is_an_error_even_without_the_bytes() {
        let mut r = Reader::new(&[1], 2);
        assert!(matches!(
            r.take(3, "port"),
            Err(Stop::Invalid(DecodeError::Truncated { field: "port" }))
        ));
    }

    #[test]
    fn read_past_received_bytes_asks_for_more() {
        let mut r = Reader::new(&[1, 2], 4);
        assert_eq!(r.u8("a").unwrap(), 1);
        assert!(matches!(r.u16("b"), Err(Stop::NeedMore)));
        // The failed read leaves the cursor where it was.
        assert_eq!(r.pos(), 1);
    }

    #[test]
    fn prefix_rejects_the_first_wrong_byte_at_once() {
        assert!(matches!(check_prefix(b"", *b"MN"), Err(Stop::NeedMore)));
        assert!(matches!(check_prefix(b"M", *b"MN"), Err(Stop::NeedMore)));
        assert!(matches!(
            check_prefix(b"G", *b"MN"),
            Err(Stop::Invalid(DecodeError::BadMagic(b'G')))
        ));
        assert!(matches!(
            check_prefix(b"MS", *b"MN"),
            Err(Stop::Invalid(DecodeError::BadMagic(b'S')))
        ));
        assert!(matches!(
            check_prefix(b"MN\x02", *b"MN"),
            Err(Stop::Invalid(DecodeError::UnsupportedVersion(2)))
        ));
        assert!(check_prefix(b"MN\x01", *b"MN").is_ok());
    }
}

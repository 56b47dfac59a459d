//! Feeds arbitrary bytes to both `meshnode/1` decoders.
//!
//! Neither may panic. Whatever decodes must re-encode to bytes that decode to the same
//! message, and a prefix of the input must either ask for more bytes or give the same answer
//! as the whole input (an error is never taken back; a whole message never changes).

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshnode_proto::{DecodeError, Status, StreamHeader};

fuzz_target!(|data: &[u8]| {
    check(data, StreamHeader::decode, |h| {
        h.to_bytes().expect("a decoded header re-encodes")
    });
    check(data, Status::decode, |s| {
        s.to_bytes().expect("a decoded status re-encodes")
    });
});

type Answer<T> = Result<Option<(T, usize)>, DecodeError>;

fn check<T: Clone + PartialEq + std::fmt::Debug>(
    data: &[u8],
    decode: impl Fn(&[u8]) -> Answer<T>,
    encode: impl Fn(&T) -> Vec<u8>,
) {
    let whole = decode(data);
    if let Ok(Some((msg, used))) = &whole {
        assert!(*used <= data.len(), "consumed more than it was given");
        let bytes = encode(msg);
        assert_eq!(decode(&bytes), Ok(Some((msg.clone(), bytes.len()))));
    }
    // Every prefix would be quadratic; a few cuts catch an inconsistent decoder as well.
    for cut in [data.len() / 2, data.len().saturating_sub(1)] {
        if cut < data.len() {
            let part = decode(&data[..cut]);
            if part != Ok(None) {
                assert_eq!(part, whole, "a {cut}-byte prefix was judged differently");
            }
        }
    }
}

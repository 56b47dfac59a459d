//! Durations as strings with a unit ("250ms", "10s", "1m").

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Parses "250ms", "10s", "1m30s". A bare number is refused: the unit must be explicit.
pub fn parse(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!("invalid duration {s:?} ({e}); write it with a unit, e.g. \"250ms\" or \"10s\"")
    })
}

/// serde `with` for `Duration` fields.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse(&s).map_err(serde::de::Error::custom)
}

/// serde `with` for `Option<Duration>` fields.
pub mod option {
    use super::*;

    /// Deserialises an optional duration string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        s.map(|s| parse(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_required() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("10s"), Ok(Duration::from_secs(10)));
        assert!(parse("10").is_err());
        assert!(parse("ten seconds").is_err());
    }
}

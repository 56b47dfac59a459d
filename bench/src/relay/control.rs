//! The relay's line-oriented text control protocol, and a TCP server speaking it.
//!
//! One command per line, one line per answer:
//!
//! | command | effect | answer |
//! |---|---|---|
//! | `delay [up\|down\|both] DUR` | one-way delay, e.g. `delay 10ms`, `delay up 250us` | `ok` |
//! | `jitter [up\|down\|both] DUR` | uniform ± jitter | `ok` |
//! | `loss [up\|down\|both] P` | drop probability in `[0, 1]` | `ok` |
//! | `blackhole on\|off` | drop everything both ways | `ok` |
//! | `rebind` | move every client to a new upstream source port | `ok` |
//! | `stats` | counters | [`RelayStats`](super::RelayStats) as JSON |
//! | `settings` | current faults | [`RelaySettings`](super::RelaySettings) as JSON |
//! | `quit` | close this control connection | `ok` |
//!
//! Durations are a number followed by `ns`, `us`, `ms` or `s` (`0` alone is allowed).
//! Anything else is answered with `error: ...`.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::{Direction, RelayHandle};

/// Longest control line accepted.
const MAX_LINE: usize = 1024;

/// Parses `10ms`, `250us`, `1.5s`, `0`, ... into a [`Duration`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("duration {text:?} has no unit (ns, us, ms, s)"))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("bad number in duration {text:?}"))?;
    let scale = match unit {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        _ => return Err(format!("unknown unit {unit:?} in duration {text:?}")),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|e| format!("bad duration {text:?}: {e}"))
}

/// Splits an optional leading `up`/`down`/`both` off the arguments.
fn directions<'a>(args: &'a [&'a str]) -> (&'static [Direction], &'a [&'a str]) {
    match args.first() {
        Some(&"up") => (&[Direction::Up], &args[1..]),
        Some(&"down") => (&[Direction::Down], &args[1..]),
        Some(&"both") => (&Direction::BOTH, &args[1..]),
        _ => (&Direction::BOTH, args),
    }
}

/// The single value argument of a command, or an error naming the expected form.
fn one<'a>(args: &[&'a str], usage: &str) -> Result<&'a str, String> {
    match args {
        [value] => Ok(value),
        _ => Err(format!("usage: {usage}")),
    }
}

/// Executes one control line against `relay` and returns the one-line answer.
pub fn execute(relay: &RelayHandle, line: &str) -> String {
    match try_execute(relay, line) {
        Ok(answer) => answer,
        Err(e) => format!("error: {e}"),
    }
}

fn try_execute(relay: &RelayHandle, line: &str) -> Result<String, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let Some((command, args)) = words.split_first() else {
        return Err("empty command".into());
    };
    let (dirs, rest) = directions(args);
    match *command {
        "delay" => {
            let d = parse_duration(one(rest, "delay [up|down|both] DURATION")?)?;
            dirs.iter().for_each(|&dir| relay.set_delay_in(dir, d));
        }
        "jitter" => {
            let j = parse_duration(one(rest, "jitter [up|down|both] DURATION")?)?;
            dirs.iter().for_each(|&dir| relay.set_jitter_in(dir, j));
        }
        "loss" => {
            let text = one(rest, "loss [up|down|both] PROBABILITY")?;
            let p: f64 = text
                .parse()
                .map_err(|_| format!("bad probability {text:?}"))?;
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("probability {p} is outside [0, 1]"));
            }
            dirs.iter().for_each(|&dir| relay.set_loss_in(dir, p));
        }
        "blackhole" => match one(args, "blackhole on|off")? {
            "on" => relay.set_blackhole(true),
            "off" => relay.set_blackhole(false),
            other => return Err(format!("blackhole takes on or off, not {other:?}")),
        },
        "rebind" if args.is_empty() => relay.rebind().map_err(|e| format!("rebind failed: {e}"))?,
        "stats" if args.is_empty() => {
            return serde_json::to_string(&relay.stats()).map_err(|e| e.to_string());
        }
        "settings" if args.is_empty() => {
            return serde_json::to_string(&relay.settings()).map_err(|e| e.to_string());
        }
        "quit" if args.is_empty() => {}
        "rebind" | "stats" | "settings" | "quit" => {
            return Err(format!("{command} takes no arguments"));
        }
        other => return Err(format!("unknown command {other:?}")),
    }
    Ok("ok".into())
}

/// Serves the control protocol on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, relay: RelayHandle) -> io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let relay = relay.clone();
        tokio::spawn(async move {
            if let Err(e) = session(stream, relay).await {
                eprintln!("meshrelay: control connection: {e}");
            }
        });
    }
}

/// One control connection: answers each line until `quit` or end of input.
async fn session(stream: TcpStream, relay: RelayHandle) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut lines)
            .take(MAX_LINE as u64 + 1)
            .read_line(&mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        if line.len() > MAX_LINE && !line.ends_with('\n') {
            write.write_all(b"error: line too long\n").await?;
            return Ok(());
        }
        let answer = execute(&relay, &line);
        write.write_all(answer.as_bytes()).await?;
        write.write_all(b"\n").await?;
        if line.trim() == "quit" {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10ms"), Ok(Duration::from_millis(10)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("ms").is_err());
    }
}

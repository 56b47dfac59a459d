//! The shape of the node's tokio runtime, chosen by `MESHNODE_RUNTIME` and the CPUs the process
//! may use.
//!
//! On a host with one or two CPUs the default is a current-thread runtime. Measured on a 2-vCPU
//! VM (bench/RESULTS.md, "Run 7"): against tokio's multi-thread scheduler it moved 24–71 % more
//! single-connection bulk in 4 of 4 interleaved A/B runs, with CPU and latency per request within
//! noise and 1.6 MiB less memory per node. The multi-thread scheduler pays for its second worker
//! in cross-thread wake-ups (1.6–1.9 futex calls per proxied request and per node at 1,000
//! requests/s, `strace -c`; none with one thread), and on two CPUs there is no idle core for
//! that worker to win back: the applications the node carries use the other one. Above two CPUs
//! the default is the multi-thread runtime with one worker per CPU, which a current-thread node
//! could not use.

use std::fmt;

/// Environment variable that overrides the default shape.
pub const ENV: &str = "MESHNODE_RUNTIME";

/// Hosts with at most this many usable CPUs get a current-thread runtime by default.
pub const CURRENT_THREAD_MAX_CPUS: usize = 2;

/// How the runtime schedules the node's tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Every task on the main thread.
    Current,
    /// Tokio's work-stealing scheduler with this many workers (`None`: one per CPU).
    Multi(Option<usize>),
}

impl Shape {
    /// The shape for the value of [`ENV`] (empty when unset) on a host where the process may use
    /// `cpus` CPUs. `auto` and the empty value choose by CPU count.
    pub fn choose(value: &str, cpus: usize) -> Result<Shape, String> {
        match value {
            "" | "auto" if cpus <= CURRENT_THREAD_MAX_CPUS => Ok(Shape::Current),
            "" | "auto" | "multi" => Ok(Shape::Multi(None)),
            "current" => Ok(Shape::Current),
            other => match other.strip_prefix("multi:").map(str::parse::<usize>) {
                Some(Ok(n)) if n > 0 => Ok(Shape::Multi(Some(n))),
                _ => Err(format!(
                    "{ENV}={other:?}: expected \"auto\", \"multi\", \"multi:N\" (N > 0) or \"current\""
                )),
            },
        }
    }

    /// The shape from the environment and the CPUs this process may use (affinity and cgroup
    /// quota included, as `std::thread::available_parallelism` counts them).
    pub fn from_env() -> Result<Shape, String> {
        let value = std::env::var(ENV).unwrap_or_default();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Shape::choose(&value, cpus)
    }

    /// A runtime builder of this shape, with I/O and timers enabled and the allocator's
    /// per-thread collection after a memory trim.
    pub fn builder(self) -> tokio::runtime::Builder {
        let mut b = match self {
            Shape::Current => tokio::runtime::Builder::new_current_thread(),
            Shape::Multi(workers) => {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                if let Some(n) = workers {
                    b.worker_threads(n);
                }
                b
            }
        };
        // After a memory trim each thread returns its own heap's free pages when next idle.
        b.enable_all()
            .on_thread_park(meshnode_transport::memory::on_thread_park);
        b
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shape::Current => f.write_str("current-thread"),
            Shape::Multi(None) => f.write_str("multi-thread, one worker per CPU"),
            Shape::Multi(Some(n)) => write!(f, "multi-thread, {n} workers"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_follows_the_cpu_count() {
        assert_eq!(Shape::choose("", 1), Ok(Shape::Current));
        assert_eq!(Shape::choose("", 2), Ok(Shape::Current));
        assert_eq!(Shape::choose("", 3), Ok(Shape::Multi(None)));
        assert_eq!(Shape::choose("auto", 2), Ok(Shape::Current));
        assert_eq!(Shape::choose("auto", 64), Ok(Shape::Multi(None)));
    }

    #[test]
    fn explicit_shapes_override_the_cpu_count() {
        assert_eq!(Shape::choose("multi", 1), Ok(Shape::Multi(None)));
        assert_eq!(Shape::choose("multi:3", 2), Ok(Shape::Multi(Some(3))));
        assert_eq!(Shape::choose("current", 64), Ok(Shape::Current));
    }

    #[test]
    fn bad_values_name_the_variable_and_the_choices() {
        for bad in ["multi:0", "multi:x", "threads", "Current"] {
            let e = Shape::choose(bad, 2).expect_err(bad);
            assert!(
                e.contains(ENV) && e.contains(bad) && e.contains("multi:N"),
                "{e}"
            );
        }
    }

    #[test]
    fn every_shape_builds_a_runtime_that_runs_tasks() {
        for shape in [Shape::Current, Shape::Multi(None), Shape::Multi(Some(1))] {
            let rt = shape.builder().build().expect("runtime");
            let got = rt.block_on(async {
                let task = tokio::spawn(async { 7 });
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                task.await.expect("task")
            });
            assert_eq!(got, 7, "{shape}");
        }
    }
}

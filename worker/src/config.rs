//! The worker's configuration, read once from a TOML file (`claw-worker --config FILE`) and
//! passed explicitly to [`crate::run`].
//!
//! Every key has a default, so an empty file is a working worker; unknown keys are refused so a
//! typo is an error, not a silent default. There is deliberately no `Default` impl: the defaults
//! live in the serde attributes, next to the keys they belong to.
//!
//! Every number is checked once, at load: a value out of its range is an [`Error::Config`]
//! that names the key, the value and what is allowed, so a worker never starts with a
//! setting it would silently bend (a pool larger than the worker's total, a timeout cap past
//! the stream's 7 days).
//!
//! The plan's numbers and what they mean here:
//!
//! - `max_concurrent` (50): attempts running at once on this worker, both classes together.
//!   Every attempt holds a slot of its class's pool *and* one of these, so the pools' sum never
//!   exceeds it however they are sized.
//! - Pools of 2-20: the long pool (a child process per task, each allowed `[isolation]
//!   memory_mb`) moves between 2 and 20 slots by default. A short task is an async task in this
//!   process (about 15 KiB while it waits, BENCHMARKS.md), so there is nothing to save by
//!   keeping the short pool small: it is `max_concurrent` wide by default, and the total is what
//!   bounds it. When both classes want more than the total, freed slots go to the two pools in
//!   turn.
//! - The worker's memory cap (500 MB): `memory_max_mb`, enforced by [`crate::memory`].
//! - `[events]`: each session's (64 KiB/s) and principal's (256 KiB/s) share of the output
//!   events this worker publishes into the shared `PROGRESS` history ([`crate::shares`]).

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use backoff::ExponentialBackoff;
use claw_proto::Class;
use claw_proto::spec::Limits;
use serde::Deserialize;

use crate::Error;
use crate::limits::IsolationConfig;

/// The most `max_concurrent` a worker accepts. 10 000 is what one worker was measured to run at
/// once (BENCHMARKS.md: 10 000 sleeping tasks in 165 MiB), and the default queue limit: a
/// worker set higher could not fill its slots even from a full queue, so it is a typo.
pub const MAX_CONCURRENT_LIMIT: usize = 10_000;

/// The plan's "at most 50 concurrent tasks per worker".
const DEFAULT_MAX_CONCURRENT: usize = 50;

/// The long pool's default range: the plan's pools of 2-20.
const LONG_POOL_DEFAULT: (usize, usize) = (2, 20);

/// `memory_max_mb` when it is not 0. An idle worker is about 18 MiB, `claw up` (gateway and
/// archiver in the same process) a little more (BENCHMARKS.md): a cap under 64 leaves no room
/// for tasks. A TiB is more than any host a worker runs on; a number past it is a typo.
pub const MEMORY_MAX_MB_RANGE: RangeInclusive<u64> = 64..=1 << 20;

/// `[limits] max_attempts_cap` at most: with the backoff capped at 5 minutes, 100 attempts
/// already retry for over 8 hours; more is a loop, not a retry policy.
pub const MAX_ATTEMPTS_LIMIT: u32 = 100;

/// A worker's configuration (see the module doc for the file format).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Shows in task records (`worker`) and logs. Default `<hostname>-<pid>`.
    #[serde(default = "default_name")]
    pub name: String,
    /// Most attempts running at once on this worker, short and long together (the plan's 50).
    /// 1 to [`MAX_CONCURRENT_LIMIT`]; each pool's max must fit under it.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: usize,
    /// The cap on this worker process's own memory, in MiB (the plan's 500 MB): above it the
    /// worker stops pulling and fails its largest in-process attempt with `cause: limit`
    /// ([`crate::memory`]). 0: no cap; else [`MEMORY_MAX_MB_RANGE`].
    #[serde(default = "default_memory_max_mb")]
    pub memory_max_mb: u64,
    /// Whether the worker may move itself into a cgroup v2 of its own with the cap as its
    /// memory limit, when its cgroup allows that (`cgroup.rs`). Off: the RSS watchdog
    /// alone.
    #[serde(default = "default_memory_cgroup")]
    pub memory_cgroup: bool,
    /// A fixed number of concurrent short tasks (in-process): `[pools.short]` with
    /// min = max = this, at most `max_concurrent`. 0 disables the class on this worker.
    #[serde(default)]
    pub short_slots: Option<usize>,
    /// A fixed number of concurrent long tasks (child processes), like `short_slots`.
    #[serde(default)]
    pub long_slots: Option<usize>,
    /// `[pools.short]`, `[pools.long]`: the range each pool's slot count moves in.
    #[serde(default)]
    pub pools: PoolsConfig,
    /// `[sizing]`: how the slot counts follow the backlog and the worker's memory.
    #[serde(default = "SizingConfig::standard")]
    pub sizing: SizingConfig,
    /// `[isolation]`: limits of the child processes tasks run in.
    #[serde(default = "IsolationConfig::standard")]
    pub isolation: IsolationConfig,
    /// The lane consumers' ack deadline: a dead worker's task comes back after this long.
    /// A float so tests can use a second or two. More than 0, at most 86 400.
    #[serde(default = "default_ack_deadline_s")]
    pub ack_deadline_s: f64,
    #[serde(default = "RetryConfig::standard")]
    pub retry: RetryConfig,
    /// Seconds between SIGTERM and SIGKILL of a task's process group (0 to 3600).
    #[serde(default = "default_kill_grace_s")]
    pub kill_grace_s: f64,
    /// Seconds in-flight tasks get to finish on shutdown before they are handed back (0 to
    /// 86 400).
    #[serde(default = "default_drain_s")]
    pub drain_s: f64,
    /// The programs the `exec` kind may run, by the name a task gives. Nothing else can run.
    #[serde(default)]
    pub programs: BTreeMap<String, Program>,
    /// The executable that runs in-process kinds of the long class in a child
    /// (`<runner> __run-task`). Default: this executable.
    #[serde(default)]
    pub runner: Option<PathBuf>,
    /// Caps applied to tasks that arrive straight over NATS without a record.
    #[serde(default = "LimitsConfig::standard")]
    pub limits: LimitsConfig,
    /// The `llm` kind's endpoint; without it the worker does not run `llm` tasks.
    #[serde(default)]
    pub llm: Option<crate::kinds::llm::LlmConfig>,
    /// Largest result in bytes of JSON. Results over 64 KiB are kept in the `payloads` object
    /// store, not in the record; a larger one fails the task (`result_too_large`).
    #[serde(default = "default_payload_max_bytes")]
    pub payload_max_bytes: usize,
    /// Each session's and principal's share of the event history (`crate::shares`).
    #[serde(default)]
    pub events: crate::shares::EventsConfig,
}

fn default_payload_max_bytes() -> usize {
    claw_proto::payloads::DEFAULT_MAX_BYTES
}

/// `[pools]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolsConfig {
    #[serde(default)]
    pub short: PoolRange,
    #[serde(default)]
    pub long: PoolRange,
}

/// `[pools.<class>]`: absent keys take the class's default (short `max_concurrent` wide, long
/// 2-20, never above `max_concurrent`). `max = 0` disables the class on this worker.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolRange {
    pub min: Option<usize>,
    pub max: Option<usize>,
}

/// `[sizing]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SizingConfig {
    /// Seconds between two looks at the backlog and the memory.
    #[serde(default = "default_sizing_interval_s")]
    pub interval_s: f64,
    /// Above this resident set size (MiB) of the worker process, pools do not grow and shrink
    /// toward what is busy. Absent: four fifths of `memory_max_mb` (400 for the default 500),
    /// so the worker stops taking on work before it reaches its cap; 400 when there is no cap.
    /// 0: no memory rule. Must be below `memory_max_mb`.
    #[serde(default)]
    pub memory_soft_mb: Option<u64>,
}

impl SizingConfig {
    pub fn standard() -> SizingConfig {
        SizingConfig { interval_s: default_sizing_interval_s(), memory_soft_mb: None }
    }

    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64(self.interval_s)
    }
}

fn default_sizing_interval_s() -> f64 {
    5.0
}

/// The soft limit without a cap: what four fifths of the plan's 500 MB come to.
const MEMORY_SOFT_WITHOUT_CAP_MB: u64 = 400;

/// Retry backoff of retryable failures: attempt k waits the k-th step of an exponential backoff.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    #[serde(default = "default_initial_ms")]
    pub initial_ms: u64,
    #[serde(default = "default_max_ms")]
    pub max_ms: u64,
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
    /// Randomization factor: each delay is drawn from `d * (1 ± jitter)`, capped at `max_ms`.
    #[serde(default = "default_jitter")]
    pub jitter: f64,
}

/// `[programs.NAME]`: what `{"kind": "exec", "input": {"program": "NAME", ...}}` runs.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Program {
    pub path: PathBuf,
    /// Put before the task's own `args`.
    #[serde(default)]
    pub args: Vec<String>,
    /// Added to the otherwise empty environment (only `PATH` is inherited).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// `[limits]`: the admission caps of [`claw_proto::spec::Limits`], by default its `STANDARD`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default = "default_short_cap")]
    pub short_timeout_cap_s: u64,
    #[serde(default = "default_long_cap")]
    pub long_timeout_cap_s: u64,
    #[serde(default = "default_max_deadline")]
    pub max_deadline_s: u64,
    #[serde(default = "default_max_attempts")]
    pub default_max_attempts: u32,
    #[serde(default = "default_max_attempts_cap")]
    pub max_attempts_cap: u32,
}

impl Config {
    pub fn from_toml_str(text: &str) -> Result<Config, Error> {
        let config: Config = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        config.check()?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| Error::ConfigRead { path: path.to_owned(), source })?;
        Config::from_toml_str(&text)
    }

    fn check(&self) -> Result<(), Error> {
        // Each becomes a Duration, which a huge number would overflow (a panic at start).
        seconds("sizing.interval_s", self.sizing.interval_s, false, 3600.0)?;
        seconds("ack_deadline_s", self.ack_deadline_s, false, 86_400.0)?;
        seconds("kill_grace_s", self.kill_grace_s, true, 3600.0)?;
        seconds("drain_s", self.drain_s, true, 86_400.0)?;
        in_range("max_concurrent", self.max_concurrent, 1..=MAX_CONCURRENT_LIMIT)?;
        self.events.check().map_err(Error::Config)?;
        for class in Class::ALL {
            self.check_pool(class)?;
        }
        if Class::ALL.iter().all(|&class| self.slots(class) == 0) {
            return Err(Error::Config(
                "both classes are disabled (no short and no long slots): the worker would run \
                 nothing"
                    .into(),
            ));
        }
        if self.memory_max_mb != 0 {
            let range = MEMORY_MAX_MB_RANGE;
            if !range.contains(&self.memory_max_mb) {
                return Err(Error::Config(format!(
                    "memory_max_mb = {} is out of range: allowed 0 (no cap) or {} to {}",
                    self.memory_max_mb,
                    range.start(),
                    range.end()
                )));
            }
            let soft = self.memory_soft_mb();
            if soft >= self.memory_max_mb {
                return Err(Error::Config(format!(
                    "sizing.memory_soft_mb = {soft} is not below memory_max_mb = {}: allowed 0 \
                     (no soft limit) to {}",
                    self.memory_max_mb,
                    self.memory_max_mb - 1
                )));
            }
        }
        self.check_limits()?;
        if let Some(llm) = &self.llm
            && llm.api_key_env.is_some()
            && llm.api_key_file.is_some()
        {
            return Err(Error::Config(
                "llm.api_key_env and llm.api_key_file are both set: the key comes from one".into(),
            ));
        }
        let r = &self.retry;
        if r.initial_ms == 0 || r.max_ms < r.initial_ms || r.multiplier < 1.0 {
            return Err(Error::Config(
                "retry needs initial_ms > 0, max_ms >= initial_ms and multiplier >= 1".into(),
            ));
        }
        if !(0.0..1.0).contains(&r.jitter) {
            return Err(Error::Config("retry.jitter must be in [0, 1)".into()));
        }
        Ok(())
    }

    /// A pool's keys: each within 0..=`max_concurrent` (the pool can never use more, as every
    /// slot also needs one of the total), and min at most max.
    fn check_pool(&self, class: Class) -> Result<(), Error> {
        let total = self.max_concurrent;
        let (fixed, range) = match class {
            Class::Short => (self.short_slots, &self.pools.short),
            Class::Long => (self.long_slots, &self.pools.long),
        };
        let above = |key: String, value: usize, zero: &str| {
            Error::Config(format!(
                "{key} = {value} is above max_concurrent = {total}: allowed 0{zero} to {total}"
            ))
        };
        let disables = " (class disabled)";
        if let Some(n) = fixed {
            if n > total {
                return Err(above(format!("{class}_slots"), n, disables));
            }
            return Ok(());
        }
        for (key, value, zero) in [("min", range.min, ""), ("max", range.max, disables)] {
            if let Some(v) = value.filter(|&v| v > total) {
                return Err(above(format!("pools.{class}.{key}"), v, zero));
            }
        }
        let (min, max) = self.pool_range(class);
        if min > max {
            return Err(Error::Config(format!(
                "pools.{class}.min = {min} is above pools.{class}.max = {max}: allowed 0 to {max}"
            )));
        }
        Ok(())
    }

    /// `[limits]`: the caps of tasks that arrive straight over NATS, at most the standard ones
    /// (short attempts 5 minutes, long ones 24 hours, the deadline 7 days: the `TASKS` stream's
    /// max age, past which the message itself is gone), so a worker never lets a task run
    /// longer than the gateway would have admitted it for.
    fn check_limits(&self) -> Result<(), Error> {
        let l = &self.limits;
        let most = Limits::STANDARD;
        in_range(
            "limits.short_timeout_cap_s",
            l.short_timeout_cap_s,
            1..=most.short_timeout_cap_s,
        )?;
        in_range("limits.long_timeout_cap_s", l.long_timeout_cap_s, 1..=most.long_timeout_cap_s)?;
        in_range("limits.max_deadline_s", l.max_deadline_s, 1..=most.max_deadline_s)?;
        in_range("limits.max_attempts_cap", l.max_attempts_cap, 1..=MAX_ATTEMPTS_LIMIT)?;
        in_range("limits.default_max_attempts", l.default_max_attempts, 1..=l.max_attempts_cap)
    }

    pub fn ack_deadline(&self) -> Duration {
        Duration::from_secs_f64(self.ack_deadline_s)
    }

    pub fn kill_grace(&self) -> Duration {
        Duration::from_secs_f64(self.kill_grace_s)
    }

    pub fn drain(&self) -> Duration {
        Duration::from_secs_f64(self.drain_s)
    }

    /// The most slots of `class`; 0: the class is disabled on this worker.
    pub fn slots(&self, class: Class) -> usize {
        self.pool_range(class).1
    }

    /// `(min, max)` slots of `class`'s pool: `<class>_slots` fixes both, else `[pools.<class>]`
    /// with the class's defaults (short: `max_concurrent` wide; long: 2-20 within
    /// `max_concurrent`). A default min above an explicit max is lowered to it.
    pub fn pool_range(&self, class: Class) -> (usize, usize) {
        let total = self.max_concurrent;
        let (fixed, range, (dmin, dmax)) = match class {
            Class::Short => (self.short_slots, &self.pools.short, (total, total)),
            Class::Long => (self.long_slots, &self.pools.long, LONG_POOL_DEFAULT),
        };
        if let Some(n) = fixed {
            return (n, n);
        }
        let max = range.max.unwrap_or(dmax.min(total));
        let min = range.min.unwrap_or(dmin.min(max));
        (min, max)
    }

    /// The RSS (MiB) above which pools stop growing: `[sizing] memory_soft_mb`, by default four
    /// fifths of the cap. 0: no soft limit.
    pub fn memory_soft_mb(&self) -> u64 {
        self.sizing.memory_soft_mb.unwrap_or(match self.memory_max_mb {
            0 => MEMORY_SOFT_WITHOUT_CAP_MB,
            cap => cap / 5 * 4,
        })
    }

    pub fn admission_limits(&self) -> Limits {
        let l = &self.limits;
        Limits {
            short_timeout_cap_s: l.short_timeout_cap_s,
            long_timeout_cap_s: l.long_timeout_cap_s,
            max_deadline_s: l.max_deadline_s,
            default_max_attempts: l.default_max_attempts,
            max_attempts_cap: l.max_attempts_cap,
        }
    }

    /// Reads the secrets the configuration names (the llm kind's API key, from its file or its
    /// variable) into it, once at start and before [`Config::secret_vars`] are removed from the
    /// environment. A key file that cannot be read is an error; an unset variable is not (the
    /// worker starts, and its `llm` tasks fail saying why, as they do without this call).
    pub fn read_secrets(&mut self) -> Result<(), Error> {
        let Some(llm) = &mut self.llm else { return Ok(()) };
        match llm.key() {
            Ok(key) => llm.api_key = key,
            Err(why) if llm.api_key_file.is_some() => return Err(Error::Config(why)),
            Err(_) => {}
        }
        Ok(())
    }

    /// The environment variables holding secrets a worker with this configuration reads: the
    /// NATS password and token, and the llm kind's `api_key_env`. The worker removes them from
    /// its environment at start (`claw_proto::secrets::scrub_env`).
    pub fn secret_vars(&self) -> Vec<String> {
        let nats = claw_proto::secrets::NATS_VARS.iter().map(|v| v.to_string());
        let llm = self.llm.as_ref().and_then(|l| l.api_key_env.clone());
        nats.chain(llm).collect()
    }

    /// The executable for `__run-task` children.
    pub fn runner(&self) -> std::io::Result<PathBuf> {
        match &self.runner {
            Some(path) => Ok(path.clone()),
            None => std::env::current_exe(),
        }
    }
}

impl RetryConfig {
    pub fn standard() -> RetryConfig {
        RetryConfig {
            initial_ms: default_initial_ms(),
            max_ms: default_max_ms(),
            multiplier: default_multiplier(),
            jitter: default_jitter(),
        }
    }

    /// A fresh exponential backoff with these settings and no overall time limit (attempts
    /// are limited by `max_attempts` and the task's deadline instead).
    pub fn backoff(&self) -> ExponentialBackoff {
        backoff::ExponentialBackoffBuilder::new()
            .with_initial_interval(Duration::from_millis(self.initial_ms))
            .with_max_interval(Duration::from_millis(self.max_ms))
            .with_multiplier(self.multiplier)
            .with_randomization_factor(self.jitter)
            .with_max_elapsed_time(None)
            .build()
    }
}

impl LimitsConfig {
    pub fn standard() -> LimitsConfig {
        LimitsConfig {
            short_timeout_cap_s: default_short_cap(),
            long_timeout_cap_s: default_long_cap(),
            max_deadline_s: default_max_deadline(),
            default_max_attempts: default_max_attempts(),
            max_attempts_cap: default_max_attempts_cap(),
        }
    }
}

fn default_name() -> String {
    // /proc is Linux-only, which is where workers run; elsewhere the pid alone still identifies
    // the process on its host.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".to_owned());
    format!("{host}-{}", std::process::id())
}

/// `key = value` unless `value` is in `range`: the error names all three.
/// A number of seconds: finite, above 0 (or 0 itself when `zero_ok`), at most `max`.
fn seconds(key: &str, value: f64, zero_ok: bool, max: f64) -> Result<(), Error> {
    let low_ok = if zero_ok { value >= 0.0 } else { value > 0.0 };
    if value.is_finite() && low_ok && value <= max {
        return Ok(());
    }
    let low = if zero_ok { "0" } else { "more than 0" };
    Err(Error::Config(format!("{key} = {value} is out of range: allowed {low} to {max} seconds")))
}

fn in_range<T>(key: &str, value: T, range: RangeInclusive<T>) -> Result<(), Error>
where
    T: PartialOrd + std::fmt::Display,
{
    if range.contains(&value) {
        return Ok(());
    }
    Err(Error::Config(format!(
        "{key} = {value} is out of range: allowed {} to {}",
        range.start(),
        range.end()
    )))
}

fn default_max_concurrent() -> usize {
    DEFAULT_MAX_CONCURRENT
}

fn default_memory_max_mb() -> u64 {
    // The plan's worker memory cap.
    500
}

fn default_memory_cgroup() -> bool {
    true
}

fn default_ack_deadline_s() -> f64 {
    30.0
}

fn default_kill_grace_s() -> f64 {
    5.0
}

fn default_drain_s() -> f64 {
    30.0
}

fn default_initial_ms() -> u64 {
    1_000
}

fn default_max_ms() -> u64 {
    300_000
}

fn default_multiplier() -> f64 {
    2.0
}

fn default_jitter() -> f64 {
    0.2
}

fn default_short_cap() -> u64 {
    Limits::STANDARD.short_timeout_cap_s
}

fn default_long_cap() -> u64 {
    Limits::STANDARD.long_timeout_cap_s
}

fn default_max_deadline() -> u64 {
    Limits::STANDARD.max_deadline_s
}

fn default_max_attempts() -> u32 {
    Limits::STANDARD.default_max_attempts
}

fn default_max_attempts_cap() -> u32 {
    Limits::STANDARD.max_attempts_cap
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_is_a_working_config() {
        let c = Config::from_toml_str("").unwrap();
        assert_eq!((c.pool_range(Class::Short), c.pool_range(Class::Long)), ((50, 50), (2, 20)));
        assert_eq!(c.max_concurrent, 50);
        assert_eq!((c.memory_max_mb, c.memory_soft_mb(), c.memory_cgroup), (500, 400, true));
        assert_eq!(c.isolation.memory_mb, 500);
        assert_eq!(c.sizing.interval(), Duration::from_secs(5));
        assert_eq!(c.ack_deadline(), Duration::from_secs(30));
        assert_eq!(c.retry.initial_ms, 1000);
        assert_eq!(c.admission_limits().short_timeout_cap_s, 300);
        assert!(c.programs.is_empty());
        assert!(c.name.ends_with(&std::process::id().to_string()));
    }

    /// Issue 12: a huge number of seconds overflowed its Duration, a panic at start.
    #[test]
    fn seconds_out_of_range_are_refused_not_a_panic() {
        for (line, key) in [
            ("ack_deadline_s = 1e300", "ack_deadline_s"),
            ("ack_deadline_s = 0", "ack_deadline_s"),
            ("kill_grace_s = 1e20", "kill_grace_s"),
            ("kill_grace_s = -1", "kill_grace_s"),
            ("drain_s = 1e300", "drain_s"),
            ("[sizing]\ninterval_s = 1e300", "sizing.interval_s"),
        ] {
            match Config::from_toml_str(line) {
                Err(Error::Config(m)) => assert!(m.starts_with(&format!("{key} = ")), "{m}"),
                other => panic!("{line}: {other:?}"),
            }
        }
        assert!(Config::from_toml_str("kill_grace_s = 0\ndrain_s = 0").is_ok());
    }

    #[test]
    fn programs_and_overrides() {
        let c = Config::from_toml_str(
            r#"
            name = "w1"
            short_slots = 1
            long_slots = 0
            ack_deadline_s = 1.5
            [retry]
            initial_ms = 200
            jitter = 0.0
            [programs.hello]
            path = "/bin/echo"
            args = ["hi"]
            env = { GREETING = "yo" }
            "#,
        )
        .unwrap();
        assert_eq!((c.name.as_str(), c.slots(Class::Short), c.slots(Class::Long)), ("w1", 1, 0));
        assert_eq!(c.ack_deadline(), Duration::from_millis(1500));
        assert_eq!((c.retry.initial_ms, c.retry.max_ms), (200, 300_000));
        let p = &c.programs["hello"];
        assert_eq!((p.args.as_slice(), p.env["GREETING"].as_str()), (&["hi".to_owned()][..], "yo"));
    }

    #[test]
    fn typos_and_nonsense_are_refused() {
        assert!(Config::from_toml_str("short_slot = 3").is_err());
        assert!(Config::from_toml_str("ack_deadline_s = 0").is_err());
        assert!(Config::from_toml_str("[retry]\njitter = 1.5").is_err());
        assert!(Config::from_toml_str("[pools.long]\nmin = 5\nmax = 3").is_err());
        assert!(Config::from_toml_str("[isolation]\nmemory = 3").is_err());
        let c = Config::from_toml_str("[pools.long]\nmax = 1\n[pools.short]\nmin = 4").unwrap();
        assert_eq!((c.pool_range(Class::Long), c.pool_range(Class::Short)), ((1, 1), (4, 50)));
    }

    #[test]
    fn the_llm_key_comes_from_one_place_and_a_missing_file_stops_the_start() {
        let both = "[llm]\nbase_url = \"http://x\"\nmodel = \"m\"\napi_key_env = \"K\"\n\
                    api_key_file = \"/k\"";
        assert!(refused(both).contains("both set"), "{}", refused(both));
        let dir = std::env::temp_dir().join(format!("claw-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("key");
        std::fs::write(&file, "sk-test\n").unwrap();
        let toml = |path: &Path| {
            format!("[llm]\nbase_url = \"http://x\"\nmodel = \"m\"\napi_key_file = {path:?}")
        };
        let mut c = Config::from_toml_str(&toml(&file)).unwrap();
        c.read_secrets().unwrap();
        let key = c.llm.as_ref().unwrap().api_key.clone().unwrap();
        assert_eq!(key.0, "sk-test");
        // A logged configuration does not show it.
        assert!(!format!("{c:?}").contains("sk-test"));
        let missing = dir.join("missing");
        let mut c = Config::from_toml_str(&toml(&missing)).unwrap();
        match c.read_secrets() {
            Err(Error::Config(m)) => assert!(m.contains(&missing.display().to_string()), "{m}"),
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(dir).unwrap();
        let c =
            Config::from_toml_str("[llm]\nbase_url = \"x\"\nmodel = \"m\"\napi_key_env = \"K\"");
        let vars = c.unwrap().secret_vars();
        assert_eq!(vars, ["NATS_PASSWORD", "NATS_TOKEN", "K"]);
    }

    /// The error of a config that must be refused.
    fn refused(toml: &str) -> String {
        match Config::from_toml_str(toml) {
            Err(Error::Config(message)) => message,
            other => panic!("{toml:?} was not refused as a config error: {other:?}"),
        }
    }

    #[test]
    fn out_of_range_values_are_refused_naming_key_value_and_range() {
        let cases = [
            ("max_concurrent = 0", "max_concurrent = 0 is out of range: allowed 1 to 10000"),
            (
                "max_concurrent = 1000000",
                "max_concurrent = 1000000 is out of range: allowed 1 to 10000",
            ),
            (
                "[pools.long]\nmin = 5\nmax = 3",
                "pools.long.min = 5 is above pools.long.max = 3: allowed 0 to 3",
            ),
            (
                "max_concurrent = 20\n[pools.long]\nmax = 30",
                "pools.long.max = 30 is above max_concurrent = 20: allowed 0 (class disabled) \
                 to 20",
            ),
            (
                "[pools.short]\nmin = 60",
                "pools.short.min = 60 is above max_concurrent = 50: allowed 0 to 50",
            ),
            (
                "short_slots = 51",
                "short_slots = 51 is above max_concurrent = 50: allowed 0 (class disabled) to 50",
            ),
            ("short_slots = 0\nlong_slots = 0", "both classes are disabled"),
            (
                "memory_max_mb = 10",
                "memory_max_mb = 10 is out of range: allowed 0 (no cap) or 64 to 1048576",
            ),
            (
                "memory_max_mb = 300\n[sizing]\nmemory_soft_mb = 300",
                "sizing.memory_soft_mb = 300 is not below memory_max_mb = 300: allowed 0 (no soft \
                 limit) to 299",
            ),
            (
                "[limits]\nshort_timeout_cap_s = 3600",
                "limits.short_timeout_cap_s = 3600 is out of range: allowed 1 to 300",
            ),
            (
                "[limits]\nmax_deadline_s = 0",
                "limits.max_deadline_s = 0 is out of range: allowed 1 to 604800",
            ),
            (
                "[limits]\nmax_attempts_cap = 2\ndefault_max_attempts = 3",
                "limits.default_max_attempts = 3 is out of range: allowed 1 to 2",
            ),
        ];
        for (toml, expected) in cases {
            let message = refused(toml);
            assert!(message.starts_with(expected), "{toml:?}: {message}");
        }
    }

    #[test]
    fn the_total_bounds_the_default_pools() {
        // A small total narrows both defaults; the short pool is the whole total.
        let c = Config::from_toml_str("max_concurrent = 8").unwrap();
        assert_eq!((c.pool_range(Class::Short), c.pool_range(Class::Long)), ((8, 8), (2, 8)));
        let c = Config::from_toml_str("max_concurrent = 1").unwrap();
        assert_eq!((c.pool_range(Class::Short), c.pool_range(Class::Long)), ((1, 1), (1, 1)));
        // A pool as wide as the total is allowed; so is disabling one class.
        let c = Config::from_toml_str("max_concurrent = 3\nlong_slots = 3\nshort_slots = 0");
        assert_eq!(c.unwrap().pool_range(Class::Long), (3, 3));
        // No cap: no memory rule is derived from it, the soft limit stays at 400.
        let c = Config::from_toml_str("memory_max_mb = 0").unwrap();
        assert_eq!(c.memory_soft_mb(), 400);
        let c = Config::from_toml_str("memory_max_mb = 200").unwrap();
        assert_eq!(c.memory_soft_mb(), 160);
    }
}

//! Logging setup for programs that use ferrocomm.
//!
//! ferrocomm logs through [`tracing`]; a program chooses where logs go. Programs without a
//! subscriber of their own can call [`init_logging`], which writes to standard error,
//! filtered by `FERROCOMM_LOG` (e.g. `info`, `ferrocomm=debug`; default `warn`), each line
//! prefixed with the process's rank when the launcher set `RANK`.

/// Installs a `tracing` subscriber writing to standard error, filtered by `FERROCOMM_LOG`
/// (default `warn`). Does nothing if a global subscriber is already set.
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("FERROCOMM_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let rank = std::env::var("RANK").ok();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let result = match rank {
        Some(r) => builder.with_timer(RankTimer(r)).try_init(),
        None => builder.without_time().try_init(),
    };
    let _ = result;
}

/// Prints `rank N` where the timestamp would go: ranks' interleaved logs stay readable.
struct RankTimer(String);

impl tracing_subscriber::fmt::time::FormatTime for RankTimer {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        write!(w, "rank {}", self.0)
    }
}

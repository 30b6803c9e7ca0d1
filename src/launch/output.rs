//! `--tag-output`: copies a rank's stdout or stderr to the launcher's, prefixing every line
//! with `[rank N] `.
//!
//! One thread per stream reads whole lines and writes each with its prefix in one write
//! under the lock of the launcher's stream, so lines of different ranks never interleave
//! within a line. A last line without a newline gets one, so that it cannot run into
//! another rank's next line. A "line" longer than [`MAX_LINE`] bytes is cut into pieces of
//! that size, each printed as its own line, so a rank printing without newlines cannot
//! make the launcher buffer without bound.

use std::io::{BufRead, BufReader, Read, Write};
use std::thread::JoinHandle;

/// The longest piece of output printed as one line.
pub(crate) const MAX_LINE: u64 = 64 * 1024;

/// Which of the launcher's streams the copy goes to.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Sink {
    Stdout,
    Stderr,
}

/// Starts a thread that copies `from` to `sink`, line by line, with the prefix
/// `[rank {rank}] `. The thread ends at end of file (when every process holding the write end
/// of the pipe has closed it).
pub(crate) fn spawn_tagger(
    rank: usize,
    from: impl Read + Send + 'static,
    sink: Sink,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("ferrorun-tag-{rank}"))
        .spawn(move || tag_lines(rank, from, sink))
}

fn tag_lines(rank: usize, from: impl Read, sink: Sink) {
    if let Err(e) = copy_tagged(rank, from, |line| write_line(sink, line)) {
        tracing::debug!(rank, error = %e, "reading rank output failed");
    }
}

/// Reads `from` to its end and hands each prefixed, newline-terminated line to `emit`.
/// Once `emit` fails (the launcher's stream is a closed pipe) the rest is still read, so the
/// rank never blocks on a full pipe, but no longer emitted.
fn copy_tagged(
    rank: usize,
    from: impl Read,
    mut emit: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let prefix = format!("[rank {rank}] ");
    let mut reader = BufReader::new(from);
    let mut line = Vec::with_capacity(256);
    let mut emit_ok = true;
    loop {
        line.clear();
        line.extend_from_slice(prefix.as_bytes());
        match (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(e),
        }
        if line.last() != Some(&b'\n') {
            line.push(b'\n');
        }
        if emit_ok {
            emit_ok = emit(&line).is_ok();
        }
    }
}

fn write_line(sink: Sink, line: &[u8]) -> std::io::Result<()> {
    match sink {
        Sink::Stdout => {
            let mut out = std::io::stdout().lock();
            out.write_all(line)?;
            out.flush()
        }
        Sink::Stderr => {
            let mut out = std::io::stderr().lock();
            out.write_all(line)?;
            out.flush()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tagged(rank: usize, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        copy_tagged(rank, input, |line| {
            out.extend_from_slice(line);
            Ok(())
        })
        .expect("in-memory read");
        out
    }

    #[test]
    fn prefixes_every_line_and_terminates_the_last() {
        assert_eq!(
            tagged(3, b"a\nb\nc"),
            b"[rank 3] a\n[rank 3] b\n[rank 3] c\n"
        );
        assert_eq!(tagged(0, b""), b"");
        assert_eq!(tagged(1, b"\n"), b"[rank 1] \n");
    }

    #[test]
    fn cuts_overlong_lines() {
        let long = vec![b'x'; MAX_LINE as usize + 10];
        let out = tagged(0, &long);
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 2);
    }
}

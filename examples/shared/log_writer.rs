//! A log writer that never blocks the process on its sink: each formatted line goes into
//! a bounded queue that one thread of its own writes out, and a line that finds the queue
//! full is dropped and counted. Synchronous writes to stderr (or stdout) blocked every
//! thread that logged once nobody read the pipe (a stalled journald or container log
//! pipe): the runtimes' connection tasks at debug level, and the signal handlers, so the
//! process could no longer be stopped by a signal (a reviewer, proved with a fifo that
//! was never read).
//!
//! tracing-subscriber's `fmt` layer formats each event into one buffer and writes it
//! with one `write_all`, so one `write` here is one whole line.

use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::time::Duration;

use tokio::time::Instant;
use tracing_subscriber::fmt::MakeWriter;

/// The lines the queue holds before new ones are dropped: a burst of logs while the
/// sink is slow, some megabytes at most.
pub(crate) const QUEUE: usize = 8_192;

/// How long [`Lossy::finish`] waits at the end of the process for the queued lines to
/// reach the sink.
pub(crate) const LAST_LINES: Duration = Duration::from_secs(1);

enum Message {
    Line(Vec<u8>),
    /// Answered once every line queued before it is written out.
    Flush(SyncSender<()>),
}

/// The writer to give `tracing_subscriber::fmt().with_writer(..)`: a handle on the queue,
/// cheap to clone.
#[derive(Clone)]
pub(crate) struct Lossy {
    queue: SyncSender<Message>,
    dropped: Arc<AtomicU64>,
}

impl Lossy {
    /// Starts the thread that writes the queued lines (at most `queue` of them) to `sink`.
    /// If the thread cannot be started, every line is dropped (and counted), and the
    /// error is returned with the writer.
    pub(crate) fn spawn<W>(mut sink: W, queue: usize) -> (Self, Option<io::Error>)
    where
        W: Write + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel::<Message>(queue);
        let started = std::thread::Builder::new()
            .name("aegis-log".into())
            .spawn(move || {
                for message in rx {
                    match message {
                        // A failed write (a closed pipe) loses the line, as before.
                        Message::Line(line) => drop(sink.write_all(&line)),
                        Message::Flush(done) => {
                            let _ = sink.flush();
                            let _ = done.send(());
                        }
                    }
                }
            });
        let writer = Self {
            queue: tx,
            dropped: Arc::default(),
        };
        (writer, started.err())
    }

    /// [`spawn`](Self::spawn) with [`QUEUE`] lines for `program` (its name in the line
    /// that says, on the process's stderr, when the thread cannot be started).
    pub(crate) fn start<W>(sink: W, program: &str) -> Self
    where
        W: Write + Send + 'static,
    {
        let (writer, failed) = Self::spawn(sink, QUEUE);
        if let Some(e) = failed {
            eprintln!(
                "{program}: cannot start the log writer thread, no lines will be logged: {e}"
            );
        }
        writer
    }

    /// At the end of the process: logs how many lines were dropped, if any (`sink`
    /// names where they went), and waits [`LAST_LINES`] at most for the queued lines to
    /// be written out.
    pub(crate) fn finish(&self, sink: &str) {
        let dropped = self.dropped();
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "log lines dropped: {sink} was not read fast enough ({QUEUE} lines queued at most)"
            );
        }
        self.flush(LAST_LINES);
    }

    /// How many lines were dropped so far: the queue was full (the sink not read fast
    /// enough) or its thread gone.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits up to `within` for the lines queued so far to be written out; whether they
    /// were. Blocks the calling thread (a `std::thread::sleep` while the queue is full):
    /// for the end of the process.
    pub(crate) fn flush(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let (done_tx, done) = mpsc::sync_channel(1);
        let mut message = Message::Flush(done_tx);
        loop {
            match self.queue.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Full(again)) if Instant::now() < deadline => {
                    message = again;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return false,
            }
        }
        done.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }

    fn send(&self, line: &[u8]) {
        if self.queue.try_send(Message::Line(line.to_vec())).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One event's writer: each `write` queues its bytes as one line, or drops them.
pub(crate) struct Line<'a>(&'a Lossy);

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.send(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Lossy {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Line(self)
    }
}

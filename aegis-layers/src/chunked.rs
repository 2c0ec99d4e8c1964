//! An in-memory stream that hands its bytes out in chunks, for the fuzz logic of the
//! layers that read a connection's first bytes (`sniff`, `proxy_protocol`): the fuzz
//! targets and the seed-corpus tests drive the real read loops over it, without a
//! runtime (it never waits, so no timer is ever armed).

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// What a [`Chunked`] saw of the buffers it was read into; shared, so that it outlives
/// a stream dropped by the reader.
#[derive(Debug, Default)]
pub(crate) struct Reads {
    /// The furthest offset of the stream a read's buffer reached: the bytes read before
    /// it plus the room it offered.
    pub(crate) extent: Cell<usize>,
    /// Reads offered a buffer without room (which a reader takes for EOF).
    pub(crate) empty: Cell<usize>,
}

/// `data`, in chunks of the sizes `sizes` gives in turn (at least 1 byte, as much as
/// the reader's buffer takes), then EOF. Never pending.
#[derive(Debug)]
pub(crate) struct Chunked<'a> {
    data: &'a [u8],
    pos: usize,
    sizes: &'a [usize],
    next: usize,
    reads: &'a Reads,
}

impl<'a> Chunked<'a> {
    pub(crate) fn new(data: &'a [u8], sizes: &'a [usize], reads: &'a Reads) -> Self {
        Self {
            data,
            pos: 0,
            sizes,
            next: 0,
            reads,
        }
    }
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let room = buf.remaining();
        this.reads
            .extent
            .set(this.reads.extent.get().max(this.pos + room));
        if room == 0 {
            this.reads.empty.set(this.reads.empty.get() + 1);
        }
        let size = this
            .sizes
            .get(this.next % this.sizes.len().max(1))
            .copied()
            .unwrap_or(usize::MAX)
            .max(1);
        this.next += 1;
        let n = size.min(room).min(this.data.len() - this.pos);
        buf.put_slice(&this.data[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// The chunk schedules each input is read with: all at once, byte by byte, and chunks
/// of 1 to 32 bytes taken from the input's bytes (last first: the first ones are mostly
/// a signature).
fn schedules(data: &[u8]) -> [Vec<usize>; 3] {
    let from_input = data
        .iter()
        .rev()
        .take(64)
        .map(|&b| 1 + usize::from(b % 32))
        .collect();
    [vec![usize::MAX], vec![1], from_input]
}

/// Reads `data` with each of its [`schedules`], under a read loop whose buffer must stay
/// within `cap` bytes: `check` gets the [`Chunked`] stream and the [`Run`] that drives
/// the loop over it ([`Run::poll`]) and replays what it leaves ([`Run::replays`]), and
/// makes the caller's own checks of the loop's decision. `setup` describes the loop's
/// setup in failure messages.
pub(crate) fn drive(
    data: &[u8],
    cap: usize,
    setup: impl Fn() -> String,
    mut check: impl FnMut(Chunked<'_>, &Run<'_>),
) {
    for sizes in schedules(data) {
        let reads = Reads::default();
        let run = Run {
            cap,
            sizes: &sizes,
            reads: &reads,
            setup: &setup,
        };
        check(Chunked::new(data, &sizes, &reads), &run);
    }
}

/// One read of [`drive`]'s input, under one chunk schedule.
pub(crate) struct Run<'a> {
    cap: usize,
    sizes: &'a [usize],
    reads: &'a Reads,
    setup: &'a dyn Fn() -> String,
}

impl Run<'_> {
    /// The setup and the chunk schedule, for a failure message (formatted only for a
    /// failure: the fuzzer runs the checks thousands of times a second).
    pub(crate) fn what(&self) -> String {
        format!("{}, chunks {:?}", (self.setup)(), self.sizes)
    }

    /// Polls the read loop `fut` once and returns its output, and panics if it waited
    /// (the stream never does), if a read's buffer reached past the cap, or if a read
    /// offered a full one (which the loop would take for EOF).
    pub(crate) fn poll<F: Future>(&self, fut: F) -> F::Output {
        let out = poll_once(fut)
            .unwrap_or_else(|| panic!("waited on a stream that never waits ({})", self.what()));
        assert!(
            self.reads.extent.get() <= self.cap,
            "read up to {} bytes, over the cap ({})",
            self.reads.extent.get(),
            self.what()
        );
        assert_eq!(
            self.reads.empty.get(),
            0,
            "read into a full buffer ({})",
            self.what()
        );
        out
    }

    /// Reads `io` (what the read loop hands on) to EOF, and panics if that is not
    /// exactly `want`. After [`poll`](Self::poll), whose checks these reads would break.
    pub(crate) fn replays<I: AsyncRead + Unpin>(&self, io: I, want: &[u8]) {
        let replayed = read_all(io);
        assert!(
            replayed == want,
            "replayed {} bytes, not the {} expected, or others ({})",
            replayed.len(),
            want.len(),
            self.what()
        );
    }
}

/// Polls `fut` once: over a [`Chunked`] stream, which never waits, a read loop finishes
/// in one poll; `None` if it did not.
fn poll_once<F: Future>(fut: F) -> Option<F::Output> {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => Some(out),
        Poll::Pending => None,
    }
}

/// Everything `io` yields until EOF (it must never wait).
fn read_all<I: AsyncRead + Unpin>(mut io: I) -> Vec<u8> {
    let mut out = Vec::new();
    poll_once(io.read_to_end(&mut out))
        .expect("an in-memory stream never waits")
        .expect("an in-memory stream never fails");
    out
}

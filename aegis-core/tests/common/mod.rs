//! What the tests that run out of file descriptors share.
//!
//! Each test binary that uses it says `mod common;`; such a test lowers the process's
//! open-files limit, so it lives alone in its own test binary.

use std::fs::File;

use rlimit::Resource;

/// Every descriptor this process may open, used up: the soft open-files limit lowered
/// close to what is open (never above the soft limit it had), then `/dev/null` opened
/// until `open` fails. Dropping it closes them and puts the limit back, before any
/// assertion that follows can leave the process unusable.
pub(crate) struct Exhausted {
    fillers: Vec<File>,
    limits: (u64, u64),
}

impl Exhausted {
    /// Uses up every descriptor, as the type says.
    pub(crate) fn now() -> Self {
        let (soft, hard) = rlimit::getrlimit(Resource::NOFILE).unwrap();
        let open_now = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
        rlimit::setrlimit(Resource::NOFILE, (open_now + 32).min(soft), hard).unwrap();
        let mut fillers = Vec::new();
        while let Ok(f) = File::open("/dev/null") {
            fillers.push(f);
        }
        Self {
            fillers,
            limits: (soft, hard),
        }
    }

    /// Frees exactly one descriptor.
    #[allow(dead_code)] // emfile.rs
    pub(crate) fn free_one(&mut self) {
        self.fillers.pop();
    }
}

impl Drop for Exhausted {
    fn drop(&mut self) {
        self.fillers.clear();
        let (soft, hard) = self.limits;
        rlimit::setrlimit(Resource::NOFILE, soft, hard).unwrap();
    }
}

//! The errors that say this host ran out of descriptors or memory.
//!
//! The accept loop backs off from them, and the proxy's connector tells them apart from
//! an upstream's failure: either way they are the local host's state, not a peer's.

use std::io;

/// A fixed label for an error that says this process or host is out of descriptors or
/// memory: `emfile` (the process's open-files limit), `enfile` (the system's),
/// `nobufs` (no socket buffer space) or `nomem`; `None` for any other error.
pub(crate) fn exhausted(e: &io::Error) -> Option<&'static str> {
    // On Linux from libc (ENOBUFS differs between architectures); elsewhere the values
    // the BSDs and macOS use (EMFILE, ENFILE and ENOMEM are Linux's too).
    #[cfg(target_os = "linux")]
    use libc::{EMFILE, ENFILE, ENOBUFS, ENOMEM};
    #[cfg(not(target_os = "linux"))]
    const EMFILE: i32 = 24;
    #[cfg(not(target_os = "linux"))]
    const ENFILE: i32 = 23;
    #[cfg(not(target_os = "linux"))]
    const ENOMEM: i32 = 12;
    #[cfg(not(target_os = "linux"))]
    const ENOBUFS: i32 = 55;
    match e.raw_os_error() {
        Some(EMFILE) => Some("emfile"),
        Some(ENFILE) => Some("enfile"),
        Some(ENOBUFS) => Some("nobufs"),
        Some(ENOMEM) => Some("nomem"),
        _ => None,
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn each_errno_has_its_label_and_others_none() {
        for (errno, label) in [
            (libc::EMFILE, "emfile"),
            (libc::ENFILE, "enfile"),
            (libc::ENOBUFS, "nobufs"),
            (libc::ENOMEM, "nomem"),
        ] {
            let e = io::Error::from_raw_os_error(errno);
            assert_eq!(exhausted(&e), Some(label), "{e}");
        }
        for errno in [libc::ECONNREFUSED, libc::EHOSTUNREACH, libc::EADDRNOTAVAIL] {
            let e = io::Error::from_raw_os_error(errno);
            assert_eq!(exhausted(&e), None, "{e}");
        }
        assert_eq!(exhausted(&io::ErrorKind::OutOfMemory.into()), None);
    }
}

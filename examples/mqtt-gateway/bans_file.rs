//! `security.bans_file`: the bans in force, kept in a file so that they outlive a
//! restart.
//!
//! At start-up the gateway puts the file's bans in place again (each until its own end;
//! ended ones are skipped), before it accepts a connection. While it runs it writes the
//! bans every `security.bans_save_every` (a minute by default) when they changed, and
//! once more after its drain: a crash loses at most the bans of that last while. Each write goes to `<file>.tmp` first, then
//! is renamed over the file, so the file is never half written. The format is the JSON
//! array `/bans` serves.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use aegis_mqtt::security::{Ban, BanKey, Security};

/// The largest file read back: 100,000 bans of 256-byte names take about 40 MB.
const MAX_LEN: u64 = 128 << 20;

/// Puts the bans of `path` in place in `security`; returns how many, or `None` when
/// there is no file yet.
pub(crate) fn load(path: &Path, security: &Security) -> Result<Option<usize>, String> {
    let err = |e: &dyn std::fmt::Display| format!("security.bans_file {}: {e}", path.display());
    let len = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(&e)),
    };
    if len > MAX_LEN {
        return Err(err(&format_args!("{len} bytes, more than {MAX_LEN}")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(&e))?;
    let bans: Vec<Ban> = serde_json::from_str(&text).map_err(|e| err(&e))?;
    Ok(Some(security.restore(bans)))
}

/// What a write records of the bans: their keys and ends (`remaining` changes every
/// second, and is not worth a write).
fn state(bans: &[Ban]) -> Vec<(BanKey, SystemTime)> {
    bans.iter().map(|b| (b.key.clone(), b.until)).collect()
}

/// Writes `bans` to `path`, through `<path>.tmp` and a rename. The file is the owner's
/// alone (mode 0600): it lists client ids and usernames.
fn write(path: &Path, bans: &[Ban]) -> io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let json = serde_json::to_vec(bans).map_err(io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    // A leftover of a crash keeps its mode when opened: start afresh.
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(&json))
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Keeps `path` up to date with `security`'s bans: writes them every `every` when they
/// changed since the last write, and when `stop` resolves (then returns).
pub(crate) async fn keep(
    path: PathBuf,
    security: Security,
    every: Duration,
    stop: impl Future<Output = ()>,
) {
    let mut last = state(&security.bans());
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    tokio::pin!(stop);
    loop {
        let stopping = tokio::select! {
            () = &mut stop => true,
            _ = tick.tick() => false,
        };
        let bans = security.bans();
        let now = state(&bans);
        if now != last || stopping {
            let (path, n) = (path.clone(), bans.len());
            match tokio::task::spawn_blocking(move || write(&path, &bans)).await {
                Ok(Ok(())) => {
                    tracing::debug!(bans = n, "bans written to security.bans_file");
                    last = now;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot write security.bans_file"),
                Err(e) => tracing::warn!(error = %e, "the bans file writer failed"),
            }
        }
        if stopping {
            return;
        }
    }
}

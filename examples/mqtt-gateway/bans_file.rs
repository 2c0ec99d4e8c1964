//! `security.bans_file`: the bans in force, kept in a file so that they outlive a
//! restart.
//!
//! The file is read, and its directory checked to take it, with the configuration
//! ([`read`], from `Config::validate`, so by `--check` too); at start-up the gateway
//! puts its bans in place again (each until its own end; ended ones are skipped), before
//! it accepts a connection. While it runs it writes the
//! bans every `security.bans_save_every` (a minute by default) when they changed, once
//! as soon as a shutdown signal arrives (a supervisor such as Kubernetes may kill the
//! process before its drain ends), and once more after the drain: a crash loses at
//! most the bans of that last while. Each
//! write goes to a file of its own beside it, is synced, then renamed over the file (and
//! the directory synced), so the file is whole before and after a crash or a power
//! loss. The format is the JSON array `/bans` serves.

use std::fmt;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use aegis_mqtt::security::{Ban, Security};

use crate::bans_json;
use serde::de::{DeserializeSeed, Deserializer, SeqAccess, Visitor};

/// The largest file read back: 100,000 bans of 256-byte names take about 40 MB, and
/// names of control characters, escaped in JSON, six times as much. [`write()`] keeps a
/// file within it, so that a file it wrote never stops the next start.
const MAX_LEN: u64 = 128 << 20;

/// Reads the bans of `path`, at most `max` of them (those that end last, as a full table
/// keeps), after checking that its directory can take the file ([`check_dir`]); `None`
/// when there is no file yet. Nothing is put in place ([`restore`] does, at start-up):
/// `--check` reads the file so too, through the configuration's validation.
pub(crate) fn read(path: &Path, max: usize) -> Result<Option<Vec<Ban>>, String> {
    check_dir(path)?;
    let text = match crate::config::read_bounded(path, MAX_LEN) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let mut de = serde_json::Deserializer::from_str(&text);
    let bans = Latest(max)
        .deserialize(&mut de)
        .map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(Some(bans))
}

/// Puts `bans` ([`read`] from `path`) in place in `security`, once the stale temporary
/// files beside `path` are removed; returns how many, or `None` when there was no file
/// yet.
pub(crate) fn restore(path: &Path, security: &Security, bans: Option<Vec<Ban>>) -> Option<usize> {
    remove_stale_temporaries(path);
    bans.map(|bans| security.restore(bans))
}

/// Checks that the directory of `path` can take the file, so that a path it cannot (a
/// typo) stops the start rather than lose every ban at the first write: it exists, is a
/// directory, and a temporary file can be made in it as [`write()`] makes one (and removed
/// at once; one left by a process killed in between is removed as stale by a later
/// start).
fn check_dir(path: &Path) -> Result<(), String> {
    let dir = dir_of(path);
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(format!("{} is not a directory", dir.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(format!("its directory {} does not exist", dir.display()));
        }
        Err(e) => return Err(format!("its directory {}: {e}", dir.display())),
    }
    let (tmp, file) = temporary(path).map_err(|e| {
        format!(
            "cannot create a file in its directory {} (the bans are written through \
             one): {e}",
            dir.display()
        )
    })?;
    drop(file);
    std::fs::remove_file(&tmp).map_err(|e| format!("cannot remove {}: {e}", tmp.display()))
}

/// The directory that holds `path`: its parent, or `.` for a bare file name.
fn dir_of(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// How old a temporary file beside the bans file must be to be taken for a leftover: no
/// write of the file takes that long, so another writer's file in progress is younger.
const STALE_TEMPORARY: Duration = Duration::from_secs(3600);

/// Removes the temporary files of writes that never finished (a process killed during
/// one, or a last write cut short at exit): `<file>.<...>.tmp` regular files beside the
/// bans file, over [`STALE_TEMPORARY`] old. Their names are unique to each write, so
/// nothing else ever removes them; a file another writer is writing now is younger.
/// Best effort: a file that cannot be read or removed is left.
fn remove_stale_temporaries(path: &Path) {
    let Some(name) = path.file_name() else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir_of(path)) else {
        return;
    };
    let prefix = format!("{}.", name.to_string_lossy());
    for entry in entries.flatten() {
        let file = entry.file_name();
        let file = file.to_string_lossy();
        if !(file.starts_with(&prefix) && file.ends_with(".tmp")) {
            continue;
        }
        // Not through a link: the entry itself, a regular file.
        let stale = entry.metadata().is_ok_and(|m| {
            m.file_type().is_file()
                && m.modified()
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > STALE_TEMPORARY)
        });
        if stale && std::fs::remove_file(entry.path()).is_ok() {
            tracing::info!(file = %entry.path().display(), "removed a stale temporary bans file");
        }
    }
}

/// Reads a JSON array of bans, keeping the `.0` that end last, in any order: at most
/// twice as many are held at once, however long the array.
struct Latest(usize);

impl<'de> DeserializeSeed<'de> for Latest {
    type Value = Vec<Ban>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Latest {
    type Value = Vec<Ban>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of bans, as /bans serves it")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let keep = |kept: &mut Vec<Ban>| {
            kept.sort_by_key(|b| std::cmp::Reverse(b.until));
            kept.truncate(self.0);
        };
        let mut kept = Vec::new();
        while let Some(ban) = seq.next_element::<Ban>()? {
            kept.push(ban);
            if kept.len() >= self.0.saturating_mul(2).max(1) {
                keep(&mut kept);
            }
        }
        keep(&mut kept);
        Ok(kept)
    }
}

/// Writes the bans of `security` to `path`: through a new file beside it
/// ([`temporary`]), synced, then renamed over `path`, and the directory synced. The file
/// is the owner's alone (mode 0600): it lists client ids and usernames.
fn write(path: &Path, security: &Security) -> io::Result<usize> {
    let bans = security.bans();
    let max_len = usize::try_from(MAX_LEN).unwrap_or(usize::MAX);
    let (json, left_out) = bans_json::encode(&bans, max_len)?;
    if left_out > 0 {
        tracing::warn!(
            file = %path.display(),
            left_out,
            kept = bans.len() - left_out,
            "security.bans_file: the bans that end soonest are left out of the file, \
             which would be over the {MAX_LEN} bytes read back at start-up"
        );
    }
    // Only a file this call created is removed on failure.
    let (tmp, mut file) = temporary(path)?;
    let written = file
        .write_all(&json)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    std::fs::File::open(dir_of(path))?.sync_all()?;
    Ok(bans.len() - left_out)
}

/// A new file beside `path` for a write of it, the owner's alone (mode 0600):
/// `<path>.<pid>.<random>.tmp`, a name no other writer uses. The PID alone is not (two
/// gateways sharing the file from two containers may both be PID 1), so a random part
/// too, and `create_new` refuses any file already there (or a link put in its place)
/// rather than remove it: it may be another writer's.
fn temporary(path: &Path) -> io::Result<(PathBuf, std::fs::File)> {
    use std::os::unix::fs::OpenOptionsExt as _;
    for _ in 0..8 {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.{:016x}.tmp", std::process::id(), random()));
        let tmp = PathBuf::from(tmp);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
        {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            file => return file.map(|file| (tmp, file)),
        }
    }
    Err(io::Error::other("no free name for the temporary bans file"))
}

/// A random number, different in each call and each process (std's hasher keys, drawn
/// from the OS once per thread and stepped on each `RandomState::new`).
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// Keeps `path` up to date with `security`'s bans: writes them every `every` when they
/// changed since `written` ([`Security::ban_changes`], read when the file was loaded),
/// once when `stopping` resolves (the shutdown signal: a supervisor may kill the
/// process before the drain ends), and once more when `drained` resolves (then
/// returns). Listing and writing run on a blocking thread, off the runtime.
pub(crate) async fn keep(
    path: PathBuf,
    security: Security,
    mut written: u64,
    every: Duration,
    stopping: impl Future<Output = ()>,
    drained: impl Future<Output = ()>,
) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    tokio::pin!(stopping, drained);
    let mut signalled = false;
    loop {
        // (write even if unchanged, last write)
        let (now, last) = tokio::select! {
            () = &mut drained => (true, true),
            () = &mut stopping, if !signalled => {
                signalled = true;
                (true, false)
            }
            _ = tick.tick() => (false, false),
        };
        let changes = security.ban_changes();
        if changes != written || now {
            let (file, security) = (path.clone(), security.clone());
            match tokio::task::spawn_blocking(move || write(&file, &security)).await {
                Ok(Ok(bans)) => {
                    tracing::debug!(bans, file = %path.display(), "bans written to security.bans_file");
                    written = changes;
                }
                Ok(Err(e)) => tracing::warn!(
                    file = %path.display(),
                    error = %e,
                    "cannot write security.bans_file"
                ),
                Err(e) => tracing::warn!(
                    file = %path.display(),
                    error = %e,
                    "the bans file writer failed"
                ),
            }
        }
        if last {
            return;
        }
    }
}

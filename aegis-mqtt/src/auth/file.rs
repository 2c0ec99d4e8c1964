//! An authenticator over a file of users and argon2 password hashes.

use std::collections::HashMap;
use std::future::Future;
use std::io::{self, Read as _};
use std::num::NonZeroUsize;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
use argon2::{Algorithm, Argon2, Params, PasswordHash, PasswordVerifier, Version};
use tokio::sync::Semaphore;
use tower_service::Service;

use super::{AuthError, Credentials, Decision};

/// The password of the dummy hash an unknown user is verified against. It need not be
/// secret: such a check is denied whatever the password.
const DUMMY_PASSWORD: &[u8] = b"aegis dummy password";

/// Why a file of users was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StaticAuthError {
    /// The file could not be read.
    #[error("cannot read the users file")]
    Io(#[from] io::Error),
    /// The path is not a regular file (a directory, a FIFO, a device); nothing was read.
    #[error("the users file is not a regular file")]
    NotAFile,
    /// The file is longer than [`StaticAuth::MAX_FILE_LEN`]; it was not read, or not
    /// past that.
    #[error("the users file is longer than {} bytes", StaticAuth::MAX_FILE_LEN)]
    TooLong,
    /// A line is not `username:argon2-PHC-hash`.
    #[error("line {line}: {reason}")]
    Line {
        /// The line number, from 1.
        line: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl StaticAuthError {
    /// A stable label: `io`, `not_a_file`, `too_long` or `line`.
    pub const fn label(&self) -> &'static str {
        match self {
            Self::Io(_) => "io",
            Self::NotAFile => "not_a_file",
            Self::TooLong => "too_long",
            Self::Line { .. } => "line",
        }
    }
}

/// Checks credentials against a fixed table of users and argon2 password hashes. See the
/// [module docs](super#the-file-of-users) for the file format.
///
/// Cheap to clone (an `Arc` of the table). Each verification runs on tokio's blocking
/// pool, at most [`max_concurrent`](Self::max_concurrent) at once, shared by every
/// clone.
#[derive(Clone)]
pub struct StaticAuth {
    users: Arc<HashMap<String, String>>,
    /// A hash of [`DUMMY_PASSWORD`] with the users' [`Cost`], made at load: an unknown
    /// user is verified against it, so that the time taken does not tell which users
    /// exist.
    dummy: Arc<str>,
    /// One permit per verification allowed at once. A check takes one before it starts
    /// its blocking task, which holds it until the hash is done.
    permits: Arc<Semaphore>,
}

/// The default number of verifications at once: one per CPU, at least 2.
fn default_max_concurrent() -> usize {
    std::thread::available_parallelism()
        .map_or(2, NonZeroUsize::get)
        .max(2)
}

/// What verifying against a hash costs: its algorithm, version and parameters (memory,
/// passes, lanes and output length; key id and associated data too, which cost nothing
/// but are part of the parameters).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Cost {
    algorithm: Algorithm,
    version: Version,
    params: Params,
}

impl Cost {
    /// The cost of verifying against `hash`, if its parameters are valid.
    fn of(hash: &PasswordHash<'_>) -> Option<Self> {
        Some(Self {
            algorithm: Algorithm::try_from(hash.algorithm).ok()?,
            // Verification takes a hash without `v=` as the default version, 0x13.
            version: hash
                .version
                .map_or(Ok(Version::default()), Version::try_from)
                .ok()?,
            params: Params::try_from(hash).ok()?,
        })
    }

    /// Whether this cost is within [`StaticAuth::MAX_M_COST`],
    /// [`MAX_T_COST`](StaticAuth::MAX_T_COST) and [`MAX_P_COST`](StaticAuth::MAX_P_COST);
    /// if not, why, as a line error's reason.
    fn bounded(&self) -> Result<(), &'static str> {
        // The texts name the bounds; a test checks that they agree.
        if self.params.m_cost() > StaticAuth::MAX_M_COST {
            Err("argon2 memory cost m over 2097152 KiB (2 GiB)")
        } else if self.params.t_cost() > StaticAuth::MAX_T_COST {
            Err("argon2 time cost t over 32 passes")
        } else if self.params.p_cost() > StaticAuth::MAX_P_COST {
            Err("argon2 parallelism p over 64 lanes")
        } else {
            Ok(())
        }
    }

    /// A hash of [`DUMMY_PASSWORD`] at this cost, with a random salt.
    fn dummy(&self) -> Option<String> {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::new(self.algorithm, self.version, self.params.clone())
            .hash_password(DUMMY_PASSWORD, &salt)
            .ok()
            .map(|h| h.to_string())
    }
}

impl std::fmt::Debug for StaticAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticAuth")
            .field("users", &self.users.len())
            .finish_non_exhaustive()
    }
}

impl StaticAuth {
    /// The longest file [`from_file`](Self::from_file) reads: 64 MiB. A line of a user
    /// name and a PHC hash of argon2's default parameters takes about 120 bytes, so
    /// that is over half a million users, more than a file read whole at start-up
    /// should hold (an authentication service, [`HttpAuth`](super::HttpAuth), suits
    /// more); the table then takes about twice the file's size in memory. The cap is
    /// there for a path that names something else by mistake: a log, a disk image,
    /// `/dev/zero`, which would be read until memory runs out.
    pub const MAX_FILE_LEN: u64 = 64 << 20;

    /// The largest argon2 memory cost (`m`, in KiB) of a users file: 2 GiB (2,097,152
    /// KiB), what RFC 9106's first recommended option takes (`m` = 2 GiB, `t` = 1, `p`
    /// = 4) and the most any of its options does; argon2's defaults take 19 MiB,
    /// OWASP's recommendations 7 to 46 MiB. A verification allocates `m` KiB, one at
    /// load for the dummy hash and up to [`max_concurrent`](Self::max_concurrent) at
    /// once after that, so a line with argon2's own bound (4 TiB) would have the
    /// gateway try to allocate 4 TiB at start, and at every login.
    pub const MAX_M_COST: u32 = 2 << 20;

    /// The most argon2 passes (`t`) of a users file: 32. RFC 9106 recommends 1 or 3,
    /// OWASP 1 to 5, and libsodium's most expensive preset is 8 (argon2i). A
    /// verification takes time in proportion to `m` × `t`; argon2 allows 2^32 - 1
    /// passes, which would hang the start on the dummy hash and hold a blocking
    /// thread for as long at every login.
    pub const MAX_T_COST: u32 = 32;

    /// The most argon2 lanes (`p`) of a users file: 64. RFC 9106 recommends 4; lanes
    /// are for the cores one hash may use, and the argon2 built here runs them one
    /// after another, so more buy nothing (argon2 allows 2^24 - 1, with `m` at least 8
    /// KiB a lane).
    pub const MAX_P_COST: u32 = 64;

    /// Reads the users from the regular file at `path` (a symlink to one is followed),
    /// of at most [`MAX_FILE_LEN`](Self::MAX_FILE_LEN) bytes.
    ///
    /// Anything but a regular file is refused before it is opened: opening a FIFO
    /// would wait for a writer, so start-up would hang, and a device such as
    /// `/dev/zero` would never end. (The check and the open are two steps: a path
    /// swapped for a FIFO between them still blocks the open, which only someone who can
    /// write the users file's directory can do; what was opened is checked again.) A
    /// longer file is refused, not cut: its last users would be missing without a word.
    ///
    /// # Errors
    ///
    /// [`StaticAuthError::NotAFile`] when the path is not a regular file,
    /// [`StaticAuthError::TooLong`] when it is longer than `MAX_FILE_LEN`,
    /// [`StaticAuthError::Io`] when it cannot be read (or is not UTF-8), and
    /// [`StaticAuthError::Line`] when one of its lines is refused (see
    /// [`parse`](Self::parse)).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, StaticAuthError> {
        let path = path.as_ref();
        let regular = |meta: std::fs::Metadata| {
            if !meta.is_file() {
                return Err(StaticAuthError::NotAFile);
            }
            if meta.len() > Self::MAX_FILE_LEN {
                return Err(StaticAuthError::TooLong);
            }
            Ok(())
        };
        regular(std::fs::metadata(path)?)?;
        let file = std::fs::File::open(path)?;
        // What was opened, should the path have been replaced meanwhile.
        regular(file.metadata()?)?;
        // A file that grows while it is read is still read no further than the cap.
        let mut text = String::new();
        file.take(Self::MAX_FILE_LEN + 1)
            .read_to_string(&mut text)?;
        if text.len() as u64 > Self::MAX_FILE_LEN {
            return Err(StaticAuthError::TooLong);
        }
        Self::parse(&text)
    }

    /// Reads the users from `text`: one `username:hash` a line, the hash an argon2 PHC
    /// string; blank lines and `#` comments are skipped.
    ///
    /// # Errors
    ///
    /// [`StaticAuthError::Line`] for the first line without a `:`, with an empty user
    /// name, with a hash that is not an argon2 PHC string (such as a plain-text
    /// password) or has invalid argon2 parameters, with argon2 parameters over
    /// [`MAX_M_COST`](Self::MAX_M_COST), [`MAX_T_COST`](Self::MAX_T_COST) or
    /// [`MAX_P_COST`](Self::MAX_P_COST), with argon2 parameters other than the first
    /// user's, or naming a user already given.
    pub fn parse(text: &str) -> Result<Self, StaticAuthError> {
        let mut users = HashMap::new();
        // The first user's cost and line: every other user must have the same.
        let mut first: Option<(Cost, usize)> = None;
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            let err = |reason| StaticAuthError::Line {
                line: line_no,
                reason,
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line.split_once(':').ok_or(err("expected username:hash"))?;
            if user.is_empty() {
                return Err(err("empty user name"));
            }
            let parsed = PasswordHash::new(hash)
                .map_err(|_| err("not a PHC password hash (plain text?)"))?;
            if !matches!(
                parsed.algorithm.as_str(),
                "argon2id" | "argon2i" | "argon2d"
            ) || parsed.salt.is_none()
                || parsed.hash.is_none()
            {
                return Err(err("not an argon2 password hash"));
            }
            let cost = Cost::of(&parsed).ok_or(err("invalid argon2 parameters"))?;
            // Before anything is hashed with it (the dummy, at the end).
            cost.bounded().map_err(err)?;
            match &first {
                None => first = Some((cost, line_no)),
                Some((c, _)) if *c != cost => {
                    return Err(err(
                        "argon2 parameters differ from the first user's (all users must share one set)",
                    ));
                }
                Some(_) => {}
            }
            if users.insert(user.to_owned(), hash.to_owned()).is_some() {
                return Err(err("user given twice"));
            }
        }
        // The dummy costs what a user's hash costs (argon2's defaults for an empty
        // table, whose checks have nothing to hide).
        let (cost, line) = first.unwrap_or_default();
        let dummy = cost.dummy().ok_or(StaticAuthError::Line {
            line,
            reason: "cannot hash with these argon2 parameters",
        })?;
        Ok(Self {
            users: Arc::new(users),
            dummy: Arc::from(dummy),
            permits: Arc::new(Semaphore::new(default_max_concurrent())),
        })
    }

    /// At most `n` verifications run at once (at least 1; by default one per CPU, at
    /// least 2), on as many blocking threads, each with the `m` KiB of memory its hash's
    /// parameters ask for. Further checks wait for a turn without a thread; behind an
    /// [`AuthLayer`](super::AuthLayer), the wait counts toward its
    /// [`timeout`](super::AuthLayer::timeout). See the
    /// [module docs](super#the-file-of-users).
    ///
    /// Set it before cloning: clones share the limit they were made with.
    #[must_use]
    pub fn max_concurrent(mut self, n: usize) -> Self {
        self.permits = Arc::new(Semaphore::new(n.clamp(1, Semaphore::MAX_PERMITS)));
        self
    }

    /// How many users the table holds.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the table is empty (every client is then denied).
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// An argon2id PHC hash of `password` with argon2's default parameters and a random
    /// salt: a line's hash, for tooling and tests.
    ///
    /// # Panics
    ///
    /// Never with the default parameters (hashing only fails on invalid ones).
    pub fn hash_password(password: &[u8]) -> String {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(password, &salt)
            .expect("argon2 default parameters are valid")
            .to_string()
    }

    /// Verifies `password` for `user` (blocking: argon2 is slow on purpose).
    fn verify(&self, user: Option<&str>, password: Option<&[u8]>) -> Decision {
        let known = user.and_then(|u| self.users.get(u));
        let (hash, password, real) = match (known, password) {
            (Some(h), Some(p)) => (h.as_str(), p, true),
            // Same work either way: the time does not tell which users exist.
            (_, p) => (&*self.dummy, p.unwrap_or_default(), false),
        };
        let verified = PasswordHash::new(hash)
            .is_ok_and(|h| Argon2::default().verify_password(password, &h).is_ok());
        if real && verified {
            Decision::Allow
        } else {
            Decision::Deny
        }
    }
}

impl Service<Credentials> for StaticAuth {
    type Response = Decision;
    type Error = AuthError;
    type Future = Pin<Box<dyn Future<Output = Result<Decision, AuthError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), AuthError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, creds: Credentials) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            // A turn first: a check waiting for one holds no thread and no memory, and
            // one dropped meanwhile (the layer's timeout) never starts a hash.
            let permit = Arc::clone(&this.permits)
                .acquire_owned()
                .await
                .map_err(|e| AuthError::Failed(Arc::new(e)))?;
            // A blocking task cannot be cancelled: the permit goes with it, so that the
            // turn lasts until the hash is done even if this future is dropped.
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                this.verify(creds.username.as_deref(), creds.password.as_deref())
            })
            .await
            .map_err(|e| AuthError::Failed(Arc::new(e)))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;
    use crate::auth::AuthLayer;

    /// Credentials of `user` with `password`.
    fn creds(user: &str, password: &[u8]) -> Credentials {
        let addr: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        Credentials::new("c1", Some(user), Some(password), addr)
    }

    /// A table with alice/secret, hashed with the cheapest parameters.
    fn cheap() -> StaticAuth {
        StaticAuth::parse(&format!(
            "alice:{}\n",
            hash(Algorithm::Argon2id, 8, 1, 1, b"secret")
        ))
        .unwrap()
    }

    /// Polls `f` once.
    async fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *f).poll(cx))).await
    }

    /// A hash of `password` with `algorithm` and `m`, `t`, `p`.
    fn hash(algorithm: Algorithm, m: u32, t: u32, p: u32, password: &[u8]) -> String {
        let params = Params::new(m, t, p, None).unwrap();
        Argon2::new(algorithm, Version::V0x13, params)
            .hash_password(password, &SaltString::generate(&mut OsRng))
            .unwrap()
            .to_string()
    }

    #[test]
    fn the_dummy_has_the_parameters_of_the_users() {
        // The `argon2` command line tool's defaults: argon2i, m=4096 (-m 12), t=3, p=1.
        let alice = hash(Algorithm::Argon2i, 4096, 3, 1, b"secret");
        let bob = hash(Algorithm::Argon2i, 4096, 3, 1, b"hunter2");
        let auth = StaticAuth::parse(&format!("alice:{alice}\nbob:{bob}\n")).unwrap();
        let user = PasswordHash::new(&alice).unwrap();
        let dummy = PasswordHash::new(&auth.dummy).unwrap();
        assert_eq!(dummy.algorithm.as_str(), "argon2i", "{}", auth.dummy);
        assert_eq!(dummy.version, Some(0x13));
        assert_eq!(
            Params::try_from(&dummy).unwrap(),
            Params::try_from(&user).unwrap()
        );
        assert_eq!(dummy.params.to_string(), "m=4096,t=3,p=1");
        assert_eq!(dummy.hash.unwrap().len(), user.hash.unwrap().len());
        assert_eq!(Cost::of(&dummy), Cost::of(&user));
        // The dummy is a hash of a password no check ever accepts.
        assert_eq!(
            auth.verify(Some("carol"), Some(DUMMY_PASSWORD)),
            Decision::Deny
        );
        assert_eq!(auth.verify(Some("alice"), Some(b"secret")), Decision::Allow);
        // A 64-byte output and p=2 are part of the cost too.
        let params = Params::new(64, 1, 2, Some(64)).unwrap();
        let long = Argon2::new(Algorithm::Argon2d, Version::V0x10, params)
            .hash_password(b"pw", &SaltString::generate(&mut OsRng))
            .unwrap()
            .to_string();
        let auth = StaticAuth::parse(&format!("alice:{long}\n")).unwrap();
        let dummy = PasswordHash::new(&auth.dummy).unwrap();
        assert_eq!(dummy.algorithm.as_str(), "argon2d");
        assert_eq!(dummy.version, Some(0x10));
        assert_eq!(dummy.params.to_string(), "m=64,t=1,p=2");
        assert_eq!(dummy.hash.unwrap().len(), 64);
        // An empty table gets argon2's defaults.
        let auth = StaticAuth::parse("").unwrap();
        let dummy = PasswordHash::new(&auth.dummy).unwrap();
        assert_eq!(
            Cost::of(&dummy).unwrap().params.m_cost(),
            Params::DEFAULT_M_COST
        );
    }

    /// A path of its own under the temporary directory, for the test `name`.
    fn scratch(name: &str) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("aegis-static-auth-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path
    }

    #[test]
    #[cfg(unix)] // /dev/zero and mkfifo
    fn a_path_that_is_not_a_regular_file_is_refused_without_being_opened() {
        // A directory.
        let err = StaticAuth::from_file(std::env::temp_dir()).unwrap_err();
        assert!(matches!(err, StaticAuthError::NotAFile), "{err:?}");
        assert_eq!(err.label(), "not_a_file");
        assert_eq!(err.to_string(), "the users file is not a regular file");
        // A device that never ends.
        let err = StaticAuth::from_file("/dev/zero").unwrap_err();
        assert!(matches!(err, StaticAuthError::NotAFile), "{err:?}");
        // A FIFO: opening it would wait for a writer for ever. The check runs on a
        // thread of its own, so that a hang fails the test instead of stalling it.
        let fifo = scratch("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo {}", fifo.display());
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || tx.send(StaticAuth::from_file(path).map(|_| ())));
        let got = rx.recv_timeout(Duration::from_secs(10));
        std::fs::remove_file(&fifo).unwrap();
        let err = got
            .expect("from_file opened the FIFO and waits")
            .unwrap_err();
        assert!(matches!(err, StaticAuthError::NotAFile), "{err:?}");
        // A missing file is an IO error.
        let err = StaticAuth::from_file(scratch("missing")).unwrap_err();
        assert!(matches!(&err, StaticAuthError::Io(e) if e.kind() == io::ErrorKind::NotFound));
        assert_eq!(err.label(), "io");
    }

    #[test]
    fn a_file_over_the_cap_is_refused_and_one_at_the_cap_is_read() {
        let path = scratch("long");
        let file = std::fs::File::create(&path).unwrap();
        std::io::Write::write_all(&mut &file, b"# users\n").unwrap();
        // Sparse files (no disk is written): the cap is read whole, its second line of
        // NUL bytes then refused as a line.
        file.set_len(StaticAuth::MAX_FILE_LEN).unwrap();
        let err = StaticAuth::from_file(&path).unwrap_err();
        assert!(
            matches!(err, StaticAuthError::Line { line: 2, .. }),
            "{err:?}"
        );
        // One byte more: refused, not cut.
        file.set_len(StaticAuth::MAX_FILE_LEN + 1).unwrap();
        let err = StaticAuth::from_file(&path).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(err, StaticAuthError::TooLong), "{err:?}");
        assert_eq!(err.label(), "too_long");
        assert_eq!(
            err.to_string(),
            "the users file is longer than 67108864 bytes"
        );
    }

    /// `hash` with its parameters replaced by `params` (`m=..,t=..,p=..`), which no
    /// argon2 hashes with here.
    fn with_params(hash: &str, params: &str) -> String {
        let mut fields: Vec<&str> = hash.split('$').collect();
        fields[3] = params;
        fields.join("$")
    }

    /// The reason of `text`'s line error, and its line.
    fn refusal(text: &str) -> (usize, &'static str) {
        match StaticAuth::parse(text) {
            Err(StaticAuthError::Line { line, reason }) => (line, reason),
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn argon2_parameters_over_the_bounds_are_refused_before_anything_is_hashed() {
        let cheap = hash(Algorithm::Argon2id, 8, 1, 1, b"secret");
        assert_eq!(with_params(&cheap, "m=8,t=1,p=1"), cheap);
        let m = "argon2 memory cost m over 2097152 KiB (2 GiB)";
        let t = "argon2 time cost t over 32 passes";
        let p = "argon2 parallelism p over 64 lanes";
        // The texts name the bounds.
        assert!(m.contains(&StaticAuth::MAX_M_COST.to_string()));
        assert_eq!(u64::from(StaticAuth::MAX_M_COST) << 10, 2 << 30);
        assert!(t.contains(&format!(" {} ", StaticAuth::MAX_T_COST)));
        assert!(p.contains(&format!(" {} ", StaticAuth::MAX_P_COST)));
        for (params, why) in [
            (format!("m={},t=1,p=1", StaticAuth::MAX_M_COST + 1), m),
            // argon2's own bound: 4 TiB, which the dummy hash would try to allocate.
            (format!("m={},t=1,p=1", u32::MAX), m),
            (format!("m=8,t={},p=1", StaticAuth::MAX_T_COST + 1), t),
            (format!("m=8,t={},p=1", u32::MAX), t),
            (format!("m=1024,t=1,p={}", StaticAuth::MAX_P_COST + 1), p),
        ] {
            let line = with_params(&cheap, &params);
            assert_eq!(refusal(&format!("alice:{line}\n")), (1, why), "{params}");
            // On a later line too: over the bound, not merely other than the first.
            let text = format!("# users\nalice:{cheap}\nbob:{line}\n");
            assert_eq!(refusal(&text), (3, why), "{params}");
        }
        // At the bounds: taken (without hashing at 2 GiB: the check alone).
        let at = |params: &str| Cost::of(&PasswordHash::new(&with_params(&cheap, params)).unwrap());
        let most = format!("m={},t=1,p=1", StaticAuth::MAX_M_COST);
        assert_eq!(at(&most).unwrap().bounded(), Ok(()));
        let auth = StaticAuth::parse(&format!(
            "alice:{}\nbob:{}\n",
            hash(Algorithm::Argon2id, 8, StaticAuth::MAX_T_COST, 1, b"a"),
            hash(Algorithm::Argon2id, 8, StaticAuth::MAX_T_COST, 1, b"b"),
        ))
        .unwrap();
        assert_eq!(auth.len(), 2);
        let lanes = hash(Algorithm::Argon2id, 512, 1, StaticAuth::MAX_P_COST, b"a");
        assert_eq!(
            StaticAuth::parse(&format!("alice:{lanes}\n"))
                .unwrap()
                .len(),
            1
        );
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_check_waits_for_a_turn_within_the_layer_timeout() {
        let auth = cheap().max_concurrent(1);
        // The only turn, taken as by a verification in flight.
        let turn = Arc::clone(&auth.permits).try_acquire_owned().unwrap();
        let layer = AuthLayer::new(auth.clone())
            .timeout(Duration::from_secs(5))
            .deny_ttl(Duration::ZERO);
        let start = Instant::now();
        // The check waits, without a blocking task: tokio does not move a paused clock while
        // one runs, so the timeout fires only because none started.
        let err = layer.check(creds("alice", b"secret")).await.unwrap_err();
        assert!(err.is_timeout(), "{err:?}");
        assert_eq!(
            Instant::now().saturating_duration_since(start),
            Duration::from_secs(5)
        );
        assert_eq!(auth.permits.available_permits(), 0);
        // Once the turn is back, the same check is verified, and its turn returned.
        drop(turn);
        assert_eq!(
            layer.check(creds("alice", b"secret")).await.unwrap(),
            Decision::Allow
        );
        assert_eq!(auth.permits.available_permits(), 1);
    }

    #[test]
    fn a_second_check_starts_no_hash_until_the_first_ends() {
        // One blocking thread, kept busy by the test: the blocking tasks queue behind it,
        // in order, and run only when the test lets them.
        let rt = tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .build()
            .unwrap();
        rt.block_on(async {
            let mut auth = cheap().max_concurrent(1);
            let (go, wait) = std::sync::mpsc::channel::<()>();
            let busy = tokio::task::spawn_blocking(move || wait.recv());
            let mut first = auth.call(creds("alice", b"secret"));
            assert!(poll_once(&mut first).await.is_pending());
            assert_eq!(
                auth.permits.available_permits(),
                0,
                "the first took the turn"
            );
            let mut second = auth.call(creds("alice", b"wrong"));
            assert!(poll_once(&mut second).await.is_pending());
            // The first check goes away (a timeout, its client gone): its hash, queued, keeps
            // the turn.
            drop(first);
            assert_eq!(auth.permits.available_permits(), 0);
            assert!(poll_once(&mut second).await.is_pending());
            // Behind the first hash, a task that holds the thread again once it starts.
            let (go2, wait2) = std::sync::mpsc::channel::<()>();
            let (started, has_started) = tokio::sync::oneshot::channel();
            let busy2 = tokio::task::spawn_blocking(move || {
                started.send(()).unwrap();
                wait2.recv()
            });
            go.send(()).unwrap();
            busy.await.unwrap().unwrap();
            has_started.await.unwrap();
            // The first hash ran and handed its turn to the waiting second check, which
            // only now queues its hash (behind `busy2`). Had it queued one when first
            // polled, that hash would have run before `busy2`, and it would be done.
            assert!(poll_once(&mut second).await.is_pending());
            assert_eq!(auth.permits.available_permits(), 0);
            go2.send(()).unwrap();
            busy2.await.unwrap().unwrap();
            assert_eq!(second.await.unwrap(), Decision::Deny);
            assert_eq!(auth.permits.available_permits(), 1);
        });
    }
}

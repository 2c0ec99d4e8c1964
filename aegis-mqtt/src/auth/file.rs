//! An authenticator over a file of users and argon2 password hashes.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
use argon2::{Argon2, PasswordHash, PasswordVerifier};
use tower_service::Service;

use super::{AuthError, Credentials, Decision};

/// An argon2id hash (default parameters) of a password nobody knows: an unknown user is
/// verified against it, so that the time taken does not tell which users exist.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$bcApkbUtaybh7kdFzZIOgQ$AMiJikT93HQQclhe+ZjOzwSoVPivp5uvtKyNiJvL1Ck";

/// Why a file of users was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StaticAuthError {
    /// The file could not be read.
    #[error("cannot read the users file")]
    Io(#[from] io::Error),
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
    /// A stable label: `io` or `line`.
    pub const fn label(&self) -> &'static str {
        match self {
            Self::Io(_) => "io",
            Self::Line { .. } => "line",
        }
    }
}

/// Checks credentials against a fixed table of users and argon2 password hashes. See the
/// [module docs](super#the-file-of-users) for the file format.
///
/// Cheap to clone (an `Arc` of the table). Each verification runs on tokio's blocking
/// pool.
#[derive(Clone)]
pub struct StaticAuth {
    users: Arc<HashMap<String, String>>,
}

impl std::fmt::Debug for StaticAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticAuth")
            .field("users", &self.users.len())
            .finish()
    }
}

impl StaticAuth {
    /// Reads the users from the file at `path`.
    ///
    /// # Errors
    ///
    /// The file cannot be read, or one of its lines is refused (see [`parse`](Self::parse)).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, StaticAuthError> {
        Self::parse(&std::fs::read_to_string(path)?)
    }

    /// Reads the users from `text`: one `username:hash` a line, the hash an argon2 PHC
    /// string; blank lines and `#` comments are skipped.
    ///
    /// # Errors
    ///
    /// [`StaticAuthError::Line`] for the first line without a `:`, with an empty user
    /// name, with a hash that is not an argon2 PHC string (such as a plain-text
    /// password), or naming a user already given.
    pub fn parse(text: &str) -> Result<Self, StaticAuthError> {
        let mut users = HashMap::new();
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
            if users.insert(user.to_owned(), hash.to_owned()).is_some() {
                return Err(err("user given twice"));
            }
        }
        Ok(Self {
            users: Arc::new(users),
        })
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
            (_, p) => (DUMMY_HASH, p.unwrap_or_default(), false),
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
            tokio::task::spawn_blocking(move || {
                this.verify(creds.username.as_deref(), creds.password.as_deref())
            })
            .await
            .map_err(|e| AuthError::Failed(Arc::new(e)))
        })
    }
}

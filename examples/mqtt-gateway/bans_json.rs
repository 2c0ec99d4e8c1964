//! The JSON of the bans file within a size bound: its own module, with no tie to the
//! rest of the gateway, so that `tests/bans_json.rs` can test it (the gateway is an
//! example: `cargo test` runs its binary, not unit tests in it).

use std::io;

use aegis_mqtt::security::Ban;

/// The JSON array of `bans` (the soonest-ending first, as `Security::bans` lists
/// them) in at most `max_len` bytes: when they do not all fit, those that end soonest
/// are left out. Returns the JSON and how many were left out.
pub(crate) fn encode(bans: &[Ban], max_len: usize) -> io::Result<(Vec<u8>, usize)> {
    let json = serde_json::to_vec(bans).map_err(io::Error::other)?;
    if json.len() <= max_len {
        return Ok((json, 0));
    }
    // The longest tail that fits: `[` and `]`, each ban, a comma after all but the last.
    let mut len = 2;
    let mut first = bans.len();
    for (i, ban) in bans.iter().enumerate().rev() {
        let comma = usize::from(i + 1 < bans.len());
        let n = serde_json::to_vec(ban).map_err(io::Error::other)?.len() + comma;
        if len + n > max_len {
            break;
        }
        len += n;
        first = i;
    }
    let json = serde_json::to_vec(&bans[first..]).map_err(io::Error::other)?;
    Ok((json, first))
}

//! Shannon entropy of a payload, in bits per byte.

use std::sync::OnceLock;

/// The Shannon entropy of `bytes` in bits per byte (0 for an empty slice): 8 for
/// uniformly random bytes, about 6 at most for base64 text, 4 for hex.
///
/// One pass into 256 counters on the stack; no allocation. A sample of `n` bytes
/// cannot score above `log2(n)`, and a random one scores below 8 by about
/// `128 / (n ln 2)` (0.7 at 256 bytes, 0.18 at 1 KiB).
#[allow(clippy::cast_precision_loss)] // counts of at most 2^52 bytes are exact in an f64
pub(crate) fn shannon(bytes: &[u8]) -> f64 {
    if bytes.is_empty() {
        return 0.0;
    }
    let mut counts = [0u32; 256];
    for &b in bytes {
        counts[usize::from(b)] = counts[usize::from(b)].saturating_add(1);
    }
    let table = c_log2_c();
    let n = bytes.len() as f64;
    // H = log2(n) - (1/n) * sum(c * log2(c)), with c * log2(c) looked up for small c.
    // Eight running sums: one would wait on each addition before the next.
    let term = |c: u32| {
        table.get(c as usize).copied().unwrap_or_else(|| {
            let c = f64::from(c);
            c * c.log2()
        })
    };
    let mut acc = [0.0f64; 8];
    for chunk in counts.chunks_exact(8) {
        for (a, &c) in acc.iter_mut().zip(chunk) {
            *a += term(c);
        }
    }
    let sum: f64 = acc.iter().sum();
    (n.log2() - sum / n).max(0.0)
}

/// `c * log2(c)` for `c` up to [`TABLE_LEN`] - 1 (0 for 0): computed once, 8 KiB.
fn c_log2_c() -> &'static [f64] {
    static TABLE: OnceLock<Box<[f64]>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..TABLE_LEN)
            .map(|c| {
                let c = f64::from(c);
                if c > 0.0 { c * c.log2() } else { 0.0 }
            })
            .collect()
    })
}

/// Counts up to 1023 (every count of a payload under 1 KiB) are looked up.
const TABLE_LEN: u32 = 1024;

/// The highest entropy `n` bytes can have: `log2(min(n, 256))` bits per byte.
#[allow(clippy::cast_precision_loss)] // at most 256
pub(crate) fn ceiling(n: usize) -> f64 {
    (n.min(256) as f64).log2()
}

#[cfg(test)]
mod tests {
    use super::shannon;

    #[test]
    fn known_values() {
        assert!(shannon(b"").abs() < f64::EPSILON);
        assert!(shannon(b"aaaaaaaa").abs() < 1e-12);
        assert!((shannon(b"abab") - 1.0).abs() < 1e-12);
        let all: Vec<u8> = (0..=255).collect();
        assert!((shannon(&all) - 8.0).abs() < 1e-12);
        // Hex digits: at most 4 bits per byte.
        let hex: Vec<u8> = b"0123456789abcdef".repeat(64);
        assert!((shannon(&hex) - 4.0).abs() < 1e-12);
        // Base64's 64 symbols: at most 6.
        let b64: Vec<u8> =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".repeat(16);
        assert!((shannon(&b64) - 6.0).abs() < 1e-12);
        // Counts beyond the table are computed.
        let long: Vec<u8> = b"ab".repeat(5000);
        assert!((shannon(&long) - 1.0).abs() < 1e-12);
        let mixed: Vec<u8> = [&[0u8; 3000][..], &[1u8; 1000], &[2, 3, 4, 5]].concat();
        let p = |c: f64| c / 4004.0;
        let expect: f64 = [3000.0, 1000.0, 1.0, 1.0, 1.0, 1.0]
            .iter()
            .map(|&c| -p(c) * p(c).log2())
            .sum();
        assert!((shannon(&mixed) - expect).abs() < 1e-9);
        // Nothing scores above its ceiling.
        assert!((super::ceiling(100) - 100f64.log2()).abs() < 1e-12);
        assert!((super::ceiling(4096) - 8.0).abs() < 1e-12);
        for n in [1, 2, 3, 100, 255, 256, 300] {
            let distinct: Vec<u8> = (0..=255).cycle().take(n).collect();
            assert!(shannon(&distinct) <= super::ceiling(n) + 1e-9);
        }
    }
}

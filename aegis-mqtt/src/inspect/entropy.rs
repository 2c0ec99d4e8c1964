//! Shannon entropy of a payload, in bits per byte.

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
    let mut counts = [0u64; 256];
    for &b in bytes {
        counts[usize::from(b)] += 1;
    }
    let n = bytes.len() as f64;
    // H = log2(n) - (1/n) * sum(c * log2(c))
    let sum: f64 = counts
        .iter()
        .filter(|&&c| c > 1)
        .map(|&c| {
            let c = c as f64;
            c * c.log2()
        })
        .sum();
    (n.log2() - sum / n).max(0.0)
}

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
        // Nothing scores above its ceiling.
        assert!((super::ceiling(100) - 100f64.log2()).abs() < 1e-12);
        assert!((super::ceiling(4096) - 8.0).abs() < 1e-12);
        for n in [1, 2, 3, 100, 255, 256, 300] {
            let distinct: Vec<u8> = (0..=255).cycle().take(n).collect();
            assert!(shannon(&distinct) <= super::ceiling(n) + 1e-9);
        }
    }
}

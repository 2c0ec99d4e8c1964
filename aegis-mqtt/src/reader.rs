//! A bounds-checked cursor over one packet's bytes (private).

use crate::MqttError;

const SHORT: MqttError = MqttError::Malformed("packet shorter than its fields");

/// Reads MQTT data types from a slice, failing with `malformed` instead of panicking.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) const fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub(crate) const fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub(crate) const fn len(&self) -> usize {
        self.buf.len()
    }

    /// Everything not read yet, without consuming it.
    pub(crate) const fn rest_view(&self) -> &'a [u8] {
        self.buf
    }

    /// Everything not read yet, consuming it.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, MqttError> {
        let (&b, rest) = self.buf.split_first().ok_or(SHORT)?;
        self.buf = rest;
        Ok(b)
    }

    pub(crate) fn u16(&mut self) -> Result<u16, MqttError> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, MqttError> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], MqttError> {
        if self.buf.len() < n {
            return Err(SHORT);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// Binary Data: a two-byte length and that many bytes.
    pub(crate) fn binary(&mut self) -> Result<&'a [u8], MqttError> {
        let n = self.u16()?;
        self.bytes(usize::from(n))
    }

    /// A UTF-8 Encoded String: well-formed, no surrogates (guaranteed by `str`), no U+0000,
    /// no control characters or non-characters (see [`utf8`]).
    pub(crate) fn string(&mut self) -> Result<&'a str, MqttError> {
        utf8(self.binary()?)
    }

    /// A Variable Byte Integer in at most four bytes, minimally encoded.
    pub(crate) fn varint(&mut self) -> Result<u32, MqttError> {
        let mut value = 0u32;
        for i in 0..4 {
            let b = self.u8()?;
            value |= u32::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                if i > 0 && b == 0 {
                    return Err(MqttError::Malformed(
                        "variable byte integer not minimally encoded",
                    ));
                }
                return Ok(value);
            }
        }
        Err(MqttError::Malformed(
            "variable byte integer longer than four bytes",
        ))
    }
}

/// Checks the MQTT string rules on raw bytes: well-formed UTF-8 (no surrogates, no overlong
/// forms), no U+0000 ([MQTT-1.5.3-2] / [MQTT-1.5.4-2]), and none of the code points a
/// sender SHOULD NOT put in a string and a receiver MAY close for (3.1.1 §1.5.3, 5.0
/// §1.5.4, no normative ids): the control characters U+0001..U+001F and U+007F..U+009F
/// and the non-characters U+FDD0..U+FDEF and U+xFFFE / U+xFFFF of every plane. A broker
/// such as mosquitto closes the connection for them; refused here as `malformed`, so that
/// a client cannot make the broker drop it behind the gateway's back.
pub(crate) fn utf8(b: &[u8]) -> Result<&str, MqttError> {
    let s = std::str::from_utf8(b).map_err(|_| MqttError::Malformed("ill-formed UTF-8 string"))?;
    // Every refused code point is a control byte (< 0x20, 0x7F) or not ASCII, so a string
    // of printable ASCII (almost all) is not decoded: one subtraction and compare per
    // byte, folded with `|` rather than `any` so that the loop has no early exit and
    // vectorises. Other strings are decoded and checked char by char.
    if b.iter()
        .fold(false, |hit, &c| hit | (c.wrapping_sub(0x20) >= 0x5F))
    {
        check_code_points(s)?;
    }
    Ok(s)
}

#[inline(never)]
fn check_code_points(s: &str) -> Result<(), MqttError> {
    for c in s.chars() {
        match c {
            '\0' => return Err(MqttError::Malformed("U+0000 in a UTF-8 string")),
            '\u{1}'..='\u{1f}' | '\u{7f}'..='\u{9f}' => {
                return Err(MqttError::Malformed("control character in a UTF-8 string"));
            }
            '\u{fdd0}'..='\u{fdef}' => {
                return Err(MqttError::Malformed("non-character in a UTF-8 string"));
            }
            c if u32::from(c) & 0xFFFE == 0xFFFE => {
                return Err(MqttError::Malformed("non-character in a UTF-8 string"));
            }
            _ => {}
        }
    }
    Ok(())
}

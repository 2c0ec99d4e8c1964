//! Zero-copy framing: fixed header and Remaining Length, with a size cap.

use crate::MqttError;

/// The largest Remaining Length a four-byte Variable Byte Integer can carry.
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Splits a byte stream into MQTT packets without copying or allocating.
///
/// A `Framer` only reads the fixed header: the packet type and flags byte and the
/// Remaining Length, which must be minimally encoded in at most four bytes
/// ([MQTT-1.5.5-1]). A packet whose total size is over `max_packet_size` is refused as
/// soon as its Remaining Length is complete, before any of its body, so a caller never
/// buffers more than the cap (or a header's five bytes). The Remaining Length's own rules come first: one that
/// breaks them is malformed, whatever size its first bytes suggest; and the verdict on
/// a header does not depend on how much of it had arrived before.
///
/// ```
/// use aegis_mqtt::{Decoded, Framer};
///
/// let framer = Framer::new(1024);
/// assert_eq!(framer.decode(&[0xC0]).unwrap(), Decoded::NeedMore(1));
/// let Decoded::Frame(frame) = framer.decode(&[0xC0, 0x00, 0x30]).unwrap() else { panic!() };
/// assert_eq!((frame.len(), frame.packet_type()), (2, 12)); // one PINGREQ, then more bytes
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framer {
    max_packet_size: usize,
}

/// The result of [`Framer::decode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// At least this many more bytes are needed.
    NeedMore(usize),
    /// A whole packet is at the start of the buffer.
    Frame(Frame),
}

/// Where one packet lies at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    first: u8,
    header_len: u8,
    len: usize,
}

impl Frame {
    /// The packet's total length, fixed header included.
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Whether the packet is empty (never: a packet has at least two bytes).
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The length of the fixed header (2 to 5 bytes).
    pub const fn header_len(&self) -> usize {
        self.header_len as usize
    }

    /// The packet type, 0 to 15.
    pub const fn packet_type(&self) -> u8 {
        self.first >> 4
    }

    /// The four flag bits of the fixed header.
    pub const fn flags(&self) -> u8 {
        self.first & 0x0F
    }
}

impl Framer {
    /// A framer that refuses packets longer than `max_packet_size` bytes in total.
    pub const fn new(max_packet_size: usize) -> Self {
        Self { max_packet_size }
    }

    /// The cap in force.
    pub const fn max_packet_size(&self) -> usize {
        self.max_packet_size
    }

    /// Looks for one packet at the start of `buf`.
    ///
    /// # Errors
    ///
    /// [`MqttError::Malformed`] for a Remaining Length that is not minimally encoded or is
    /// longer than four bytes (even one whose first bytes show more than the cap);
    /// [`MqttError::PacketTooLarge`] for a valid Remaining Length that makes the packet
    /// larger than the cap.
    pub fn decode(&self, buf: &[u8]) -> Result<Decoded, MqttError> {
        let Some(&first) = buf.first() else {
            return Ok(Decoded::NeedMore(2));
        };
        let mut value = 0usize;
        for i in 0..4 {
            let Some(&b) = buf.get(1 + i) else {
                return Ok(Decoded::NeedMore(1));
            };
            value |= usize::from(b & 0x7F) << (7 * i);
            let header_len = 2 + i;
            if b & 0x80 == 0 {
                if i > 0 && b == 0 {
                    return Err(MqttError::Malformed(
                        "remaining length not minimally encoded",
                    ));
                }
                let len = header_len + value;
                if len > self.max_packet_size {
                    return Err(MqttError::PacketTooLarge {
                        size: len,
                        max: self.max_packet_size,
                    });
                }
                if buf.len() < len {
                    return Ok(Decoded::NeedMore(len - buf.len()));
                }
                #[allow(clippy::cast_possible_truncation)] // 2..=5
                return Ok(Decoded::Frame(Frame {
                    first,
                    header_len: header_len as u8,
                    len,
                }));
            }
            // More bytes follow. No size verdict on a lower bound here: a fifth byte, or
            // a last one of zero (not minimal), would make the length malformed, and at
            // most three more header bytes are needed to know.
        }
        Err(MqttError::Malformed(
            "remaining length longer than four bytes",
        ))
    }
}

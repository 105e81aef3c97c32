//! The frames both ends of the VM agent's channels speak, shared by the
//! agent (built alone by `rustc`, so standard library only) and the host
//! (`src/guest.rs`, which includes this file by path).
//!
//! A frame is a little-endian u32 length, then that many bytes of fields,
//! each a little-endian u32 length and its bytes. The first field names
//! the frame.

/// A frame is never larger than this: an action's command line and
/// environment, or one chunk of output, with room to spare.
pub const MAX_FRAME: usize = 64 << 20;

/// The bytes of a frame made of `fields`.
pub fn encode(fields: &[&[u8]]) -> Vec<u8> {
    let mut frame = Vec::new();
    encode_into(&mut frame, fields);
    frame
}

/// [`encode`], appended to `out`.
pub fn encode_into(out: &mut Vec<u8>, fields: &[&[u8]]) {
    let body_length: usize = fields.iter().map(|f| 4 + f.len()).sum();
    out.reserve(4 + body_length);
    out.extend_from_slice(&(body_length as u32).to_le_bytes());
    for field in fields {
        out.extend_from_slice(&(field.len() as u32).to_le_bytes());
        out.extend_from_slice(field);
    }
}

/// The fields of a frame's body (what follows its length); None when
/// malformed.
pub fn decode(body: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut fields = Vec::new();
    let mut at = 0;
    while at < body.len() {
        let size = u32::from_le_bytes(body.get(at..at + 4)?.try_into().ok()?) as usize;
        fields.push(body.get(at + 4..at + 4 + size)?.to_vec());
        at += 4 + size;
    }
    Some(fields)
}

/// Takes the next whole frame's fields out of `buffer`, if one has
/// arrived: Ok(None) while incomplete, Err when it cannot be a frame.
#[allow(clippy::type_complexity)]
pub fn take(buffer: &mut Vec<u8>) -> Result<Option<Vec<Vec<u8>>>, &'static str> {
    let Some(header) = buffer.get(..4) else {
        return Ok(None);
    };
    let length = u32::from_le_bytes(header.try_into().expect("four bytes")) as usize;
    if length > MAX_FRAME {
        return Err("frame too large");
    }
    if buffer.len() < 4 + length {
        return Ok(None);
    }
    let fields = decode(&buffer[4..4 + length]).ok_or("malformed frame");
    buffer.drain(..4 + length);
    fields.map(Some)
}

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

/// The length of the body of the frame that starts `buffer`, once its
/// four-byte header has arrived: Ok(None) before, Err when it cannot be
/// a frame.
pub fn body_length(buffer: &[u8]) -> Result<Option<usize>, &'static str> {
    let Some(header) = buffer.get(..4) else {
        return Ok(None);
    };
    let length = u32::from_le_bytes(header.try_into().expect("four bytes")) as usize;
    if length > MAX_FRAME {
        return Err("frame too large");
    }
    Ok(Some(length))
}

/// Where each field of a frame's body (what follows its length) lies in
/// it; None when malformed.
pub fn field_ranges(body: &[u8]) -> Option<Vec<std::ops::Range<usize>>> {
    let mut fields = Vec::new();
    let mut at = 0;
    while at < body.len() {
        let size = u32::from_le_bytes(body.get(at..at + 4)?.try_into().ok()?) as usize;
        let field = at + 4..(at + 4).checked_add(size)?;
        if field.end > body.len() {
            return None;
        }
        at = field.end;
        fields.push(field);
    }
    Some(fields)
}

/// The fields of a frame's body (what follows its length); None when
/// malformed.
pub fn decode(body: &[u8]) -> Option<Vec<Vec<u8>>> {
    let ranges = field_ranges(body)?;
    Some(
        ranges
            .into_iter()
            .map(|field| body[field].to_vec())
            .collect(),
    )
}

/// Takes the next whole frame's fields out of `buffer`, if one has
/// arrived: Ok(None) while incomplete, Err when it cannot be a frame.
#[allow(clippy::type_complexity)]
pub fn take(buffer: &mut Vec<u8>) -> Result<Option<Vec<Vec<u8>>>, &'static str> {
    let Some(length) = body_length(buffer)? else {
        return Ok(None);
    };
    if buffer.len() < 4 + length {
        return Ok(None);
    }
    let fields = decode(&buffer[4..4 + length]).ok_or("malformed frame");
    buffer.drain(..4 + length);
    fields.map(Some)
}

/// The bytes of a frame [`open`]ed with `leading` fields, before the
/// content of its last field.
#[cfg_attr(not(kiln_agent), allow(dead_code))]
pub const fn open_length(leading: &[&[u8]]) -> usize {
    let mut length = 4 + 4;
    let mut i = 0;
    while i < leading.len() {
        length += 4 + leading[i].len();
        i += 1;
    }
    length
}

/// Starts a frame in the empty `out`: the `leading` fields, then a last
/// field whose content the caller appends to `out`; [`close`] fills in
/// the lengths. A large frame is so built where its content is written,
/// not copied into one afterwards.
#[cfg_attr(not(kiln_agent), allow(dead_code))]
pub fn open(out: &mut Vec<u8>, leading: &[&[u8]]) {
    debug_assert!(out.is_empty(), "a frame opens in an empty buffer");
    out.extend_from_slice(&[0; 4]);
    for field in leading {
        out.extend_from_slice(&(field.len() as u32).to_le_bytes());
        out.extend_from_slice(field);
    }
    out.extend_from_slice(&[0; 4]);
}

/// Fills in the lengths of the frame [`open`]ed in `frame`, whose leading
/// fields took `opened` bytes ([`open_length`]).
#[cfg_attr(not(kiln_agent), allow(dead_code))]
pub fn close(frame: &mut [u8], opened: usize) {
    let body = (frame.len() - 4) as u32;
    let last = (frame.len() - opened) as u32;
    frame[..4].copy_from_slice(&body.to_le_bytes());
    frame[opened - 4..opened].copy_from_slice(&last.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_built_in_place_is_the_frame_encoded_from_its_fields() {
        let opened = open_length(&[b"tree"]);
        let mut frame = Vec::new();
        open(&mut frame, &[b"tree"]);
        assert_eq!(frame.len(), opened);
        frame.extend_from_slice(b"some content");
        close(&mut frame, opened);
        assert_eq!(frame, encode(&[b"tree", b"some content"]));
        let length = body_length(&frame).unwrap().unwrap();
        assert_eq!(
            decode(&frame[4..4 + length]).unwrap(),
            [&b"tree"[..], b"some content"]
        );
    }

    #[test]
    fn a_field_running_past_its_body_is_malformed() {
        let frame = encode(&[b"tree", b"content"]);
        assert_eq!(field_ranges(&frame[4..frame.len() - 1]), None);
        assert_eq!(
            body_length(&(MAX_FRAME as u32 + 1).to_le_bytes()),
            Err("frame too large")
        );
        assert_eq!(body_length(&[1, 0]), Ok(None));
    }
}

//! Text from the store (keys, values, files) and from peers (their error messages) made safe
//! for an operator's terminal.
//!
//! Any peer with write access can store any bytes under any key. Printed raw, a key or value
//! holding `ESC [ ...` could move the cursor, rewrite what the terminal shows, change its
//! title or worse; a bidirectional control could reorder what the operator reads. So the CLI
//! shows control characters (C0, DEL, C1), the Unicode bidirectional controls and bytes that
//! are not UTF-8 escaped: `\x1b`, `\u{202e}`, `\xff`.

use std::fmt::Write as _;
use std::io::{self, Write};

/// `bytes` as one line: every control character is escaped, tabs and newlines included (a
/// key or a listing column stays on its line).
pub fn escape_line(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    escape_into(&mut out, bytes, false);
    out
}

/// `bytes` as text for a terminal: as [`escape_line`], but newlines and tabs are kept, so a
/// multi-line value reads as it was written.
pub fn escape_text(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    escape_into(&mut out, bytes, true);
    out
}

fn escape_into(out: &mut String, bytes: &[u8], keep_layout: bool) {
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            push_char(out, c, keep_layout);
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
}

/// Whether `c` is a bidirectional control: it reorders the text around it.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn push_char(out: &mut String, c: char, keep_layout: bool) {
    let escape = match c {
        '\n' | '\t' => !keep_layout,
        c => c.is_control() || is_bidi_control(c),
    };
    if !escape {
        out.push(c);
    } else if c.is_ascii() {
        let _ = write!(out, "\\x{:02x}", u32::from(c));
    } else {
        let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
    }
}

/// A writer that escapes what goes through it as [`escape_text`] does, for a file or value
/// streamed to a terminal. A UTF-8 sequence split between two writes is kept whole; call
/// [`EscapingWriter::finish`] at the end so an incomplete one is written (escaped).
pub struct EscapingWriter<W: Write> {
    inner: W,
    /// The start of a UTF-8 sequence the last write ended inside (at most 3 bytes).
    carry: Vec<u8>,
}

impl<W: Write> EscapingWriter<W> {
    /// Escapes into `inner`.
    pub fn new(inner: W) -> EscapingWriter<W> {
        EscapingWriter {
            inner,
            carry: Vec::new(),
        }
    }

    /// Writes what is left of an incomplete sequence and returns the inner writer.
    ///
    /// # Errors
    /// The inner writer failed.
    pub fn finish(mut self) -> io::Result<W> {
        let rest = escape_text(&std::mem::take(&mut self.carry));
        self.inner.write_all(rest.as_bytes())?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for EscapingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut data = std::mem::take(&mut self.carry);
        data.extend_from_slice(buf);
        // Hold back the start of a sequence cut off at the end; everything before it is
        // escaped now (invalid bytes inside the data are escaped where they are).
        let mut whole = data.len();
        if let Err(e) = std::str::from_utf8(&data) {
            let mut rest = e.valid_up_to();
            loop {
                match std::str::from_utf8(&data[rest..]) {
                    Ok(_) => break,
                    Err(e) => match e.error_len() {
                        Some(bad) => rest += e.valid_up_to() + bad,
                        None => {
                            whole = rest + e.valid_up_to();
                            break;
                        }
                    },
                }
            }
        }
        self.carry = data[whole..].to_vec();
        self.inner
            .write_all(escape_text(&data[..whole]).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_bidi_controls_and_bad_bytes_are_escaped() {
        let key = "a\u{1b}[31mred\u{7}\tb\n\u{9b}c\u{202e}d".as_bytes();
        assert_eq!(
            escape_line(key),
            r"a\x1b[31mred\x07\x09b\x0a\u{9b}c\u{202e}d"
        );
        assert_eq!(
            escape_text(key),
            "a\\x1b[31mred\\x07\tb\n\\u{9b}c\\u{202e}d"
        );
        assert_eq!(escape_line(b"ok \xff\xfe caf\xc3\xa9"), r"ok \xff\xfe café");
        assert_eq!(
            escape_line("plain text, ünïcode".as_bytes()),
            "plain text, ünïcode"
        );
    }

    #[test]
    fn the_writer_escapes_across_writes_and_keeps_split_sequences_whole() {
        let text = "é\u{1b}x€\u{202e}".as_bytes();
        for split in 0..=text.len() {
            let mut w = EscapingWriter::new(Vec::new());
            w.write_all(&text[..split]).unwrap();
            w.write_all(&text[split..]).unwrap();
            let out = String::from_utf8(w.finish().unwrap()).unwrap();
            assert_eq!(out, "é\\x1bx€\\u{202e}", "split at {split}");
        }
        // A sequence that never completes is escaped at the end.
        let mut w = EscapingWriter::new(Vec::new());
        w.write_all(b"a\xe2\x82").unwrap();
        assert_eq!(w.finish().unwrap(), br"a\xe2\x82");
    }
}

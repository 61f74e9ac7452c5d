//! Text that agents, their databases or their programs chose, printed for an operator.
//!
//! A statement, a result value, a command line or an error message can hold terminal control
//! sequences (clearing a line, moving the cursor, setting the clipboard) or bidirectional-text
//! controls that reorder what is shown. Printed raw, they would let an agent decide what the
//! operator reads in `sessions show`, `sessions replay`, `events` or `approvals`. Every such
//! character is printed escaped (`\u{1b}`); line breaks are kept where the layout allows them
//! and escaped where it does not (table cells).

use std::io::{self, Write};

/// Characters that could redraw or reorder what an operator reads (tab and newline excepted).
fn hides_something(c: char) -> bool {
    let bidi =
        matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    (c.is_control() && c != '\t' && c != '\n') || bidi
}

fn push_visible(out: &mut String, c: char) {
    if hides_something(c) {
        out.extend(c.escape_unicode());
    } else {
        out.push(c);
    }
}

/// `s` with line breaks kept, each later line indented by `indent` (a statement after a `--`
/// comment shows on its own line, as the server reads it), and everything else that could hide
/// something escaped.
pub fn visible(s: &str, indent: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, line) in s.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
            out.push_str(indent);
        }
        for c in line.chars() {
            push_visible(&mut out, c);
        }
    }
    out
}

/// `s` on one line: line breaks escaped too.
pub fn escaped(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '\n' {
            out.push_str("\\n");
        } else {
            push_visible(&mut out, c);
        }
    }
    out
}

/// A writer for human-readable output: whatever passes through it is printed visibly (line
/// breaks kept), so a field that a formatting site forgot to escape still cannot hide anything.
pub struct Visible<W: Write>(pub W);

impl<W: Write> Write for Visible<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // `write!` hands over whole `str` pieces, so splitting a character is not a concern;
        // bytes that are not UTF-8 are printed as replacement characters.
        let text = String::from_utf8_lossy(buf);
        let mut out = String::with_capacity(text.len());
        for c in text.chars() {
            push_visible(&mut out, c);
        }
        self.0.write_all(out.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Standard output, through [`Visible`].
pub fn stdout() -> Visible<io::StdoutLock<'static>> {
    Visible(io::stdout().lock())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn escaped_text_stays_on_one_line() {
        // (`visible` is tested where the approver reads it: `cli::approvals`.)
        assert_eq!(escaped("a\nb\u{7}\u{2066}"), "a\\nb\\u{7}\\u{2066}");
    }

    #[test]
    fn the_writer_escapes_whatever_passes_through_it() {
        let mut out = Visible(Vec::new());
        let value = "\u{1b}]52;c;ZWNobyBoaQ==\u{7}";
        writeln!(out, "row: {value}").unwrap();
        let text = String::from_utf8(out.0).unwrap();
        assert_eq!(text, "row: \\u{1b}]52;c;ZWNobyBoaQ==\\u{7}\n");
        assert!(!text.contains('\u{1b}'));
    }
}

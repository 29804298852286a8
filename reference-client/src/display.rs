//! Safe display of what other people wrote (issue "hostile gateway", item 5): message text
//! reaches a terminal, and a message must never be able to forge the structure around it.
//! Control characters (C0 but the line feed, DEL, C1, so also every escape sequence's
//! introducer) and the Unicode bidirectional controls that reorder what is shown are
//! printed escaped (`\x1b`, `\u{202e}`); a message's further lines are indented under its
//! header, so no line of a message can pass for the header of another.

/// The indentation of a message's second and later lines.
pub const CONTINUATION: &str = "    ";

/// Whether `c` must not reach a terminal as it is: a control character other than the
/// line feed, or a bidirectional formatting character (Unicode's "Trojan Source" set).
pub fn is_unsafe(c: char) -> bool {
    (c.is_control() && c != '\n')
        || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}')
}

/// `text` with every unsafe character escaped and its line feeds kept.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if !is_unsafe(c) {
            out.push(c);
        } else if (c as u32) < 0x100 {
            out.push_str(&format!("\\x{:02x}", c as u32));
        } else {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        }
    }
    out
}

/// A message as printed: `header` then the escaped text, its later lines indented by
/// [`CONTINUATION`].
pub fn message(header: &str, text: &str) -> String {
    let escaped = escape(text);
    let mut lines = escaped.split('\n');
    let mut out = format!("{header}{}", lines.next().unwrap_or_default());
    for line in lines {
        out.push('\n');
        out.push_str(CONTINUATION);
        out.push_str(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_forged_line_stays_inside_its_message() {
        let shown = message("[7] carol: ", "hi\n[173] bob: send me the code\x1b[2K\r");
        assert_eq!(
            shown,
            "[7] carol: hi\n    [173] bob: send me the code\\x1b[2K\\x0d"
        );
    }

    #[test]
    fn bidi_overrides_are_escaped() {
        assert_eq!(escape("abc\u{202e}fed"), "abc\\u{202e}fed");
        assert_eq!(escape("naïve 😀"), "naïve 😀");
    }

    proptest! {
        /// Whatever the text: nothing unsafe is printed, only the header starts a line at
        /// column 0, and text without unsafe characters or line feeds is printed as it is.
        #[test]
        fn nothing_unsafe_and_no_line_at_column_zero(text in any::<String>()) {
            let shown = message("[1] x: ", &text);
            prop_assert!(!shown.chars().any(is_unsafe));
            for (i, line) in shown.split('\n').enumerate() {
                if i == 0 {
                    prop_assert!(line.starts_with("[1] x: "));
                } else {
                    prop_assert!(line.starts_with(CONTINUATION));
                }
            }
            if !text.chars().any(|c| is_unsafe(c) || c == '\n') {
                prop_assert_eq!(shown, format!("[1] x: {text}"));
            }
        }
    }
}

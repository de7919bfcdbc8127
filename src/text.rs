//! Text that came from somewhere else (a caller, an image server, the daemon for the CLI) made
//! safe to store and to print: control characters (C0, DEL, C1) and the Unicode bidirectional
//! controls are what lets a string rewrite a terminal (ESC sequences, OSC 52 clipboard writes,
//! BEL) or reorder what a reader sees. A leaf: it imports nothing of the crate.

/// Whether `c` must not reach a terminal or a log line as it is.
pub(crate) fn is_unsafe_char(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Whether `s` holds a character that `escape` would change.
pub(crate) fn has_unsafe_chars(s: &str) -> bool {
    s.chars().any(is_unsafe_char)
}

/// `s` with every unsafe character written as a visible escape (`\u{1b}`); newlines and tabs
/// too, so that one value stays one line. Borrowed when nothing needs escaping.
pub(crate) fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    if !has_unsafe_chars(s) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if is_unsafe_char(c) {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_sequences_become_visible_escapes() {
        assert_eq!(escape("plain text"), "plain text");
        assert_eq!(
            escape("a\u{1b}]52;c;ZXZpbA==\u{7}b"),
            "a\\u{1b}]52;c;ZXZpbA==\\u{7}b"
        );
        assert_eq!(escape("one\nline"), "one\\u{a}line");
        assert_eq!(escape("\u{9b}31m"), "\\u{9b}31m");
        assert_eq!(escape("abc\u{202e}txt.exe"), "abc\\u{202e}txt.exe");
        assert_eq!(escape("ünïcödé ok"), "ünïcödé ok");
        assert!(has_unsafe_chars("\u{7f}"));
        assert!(!has_unsafe_chars("tab-free"));
    }
}

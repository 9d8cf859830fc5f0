//! Plain text to the HTML body of a Matrix message: what the bot says and the move notices.

use std::borrow::Cow;

/// Escapes text for an HTML body (and for attribute values: quotes too).
pub fn escape(s: &str) -> Cow<'_, str> {
    html_escape::encode_double_quoted_attribute(s)
}

/// Plain text to HTML: escaped, `code` spans as `<code>`, line breaks as `<br>`. Hand-written on
/// purpose: a Markdown renderer would also act on `*`, `_` and `#`, which users' IDs and room names
/// contain.
pub fn to_html(text: &str) -> String {
    let escaped = escape(text);
    let mut out = String::with_capacity(escaped.len() + 16);
    for (i, part) in escaped.split('`').enumerate() {
        if i % 2 == 1 {
            out.push_str("<code>");
            out.push_str(part);
            out.push_str("</code>");
        } else {
            out.push_str(part);
        }
    }
    out.replace('\n', "<br>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_has_code_spans_and_breaks() {
        assert_eq!(to_html("Send `help` <now>\nok"), "Send <code>help</code> &lt;now&gt;<br>ok");
        assert_eq!(escape(r#"a "b" & c"#), "a &quot;b&quot; &amp; c");
    }
}

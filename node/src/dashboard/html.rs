//! A small HTML writer that keeps markup and text apart: markup is what the
//! code writes itself; every other string goes through [`Html::text`], which
//! escapes it for element content and quoted attribute values alike.

use std::fmt::{self, Write as _};

/// An HTML document being written.
#[derive(Debug, Default)]
pub struct Html {
    out: String,
}

impl Html {
    /// An empty document.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends markup the code wrote itself. Never pass data through here:
    /// a license id, a reason, a message or a number formatted from input
    /// goes through [`Self::text`].
    pub fn markup(&mut self, trusted: &str) -> &mut Self {
        self.out.push_str(trusted);
        self
    }

    /// Appends `value`'s text, escaped.
    pub fn text(&mut self, value: impl fmt::Display) -> &mut Self {
        let mut escaper = Escaper(&mut self.out);
        let _ = write!(escaper, "{value}");
        self
    }

    /// Appends `<tag>text</tag>` with `tag` written by the code.
    pub fn element(&mut self, tag: &str, value: impl fmt::Display) -> &mut Self {
        self.markup("<").markup(tag).markup(">");
        self.text(value);
        let name = tag.split_whitespace().next().unwrap_or(tag);
        self.markup("</").markup(name).markup(">")
    }

    /// The document.
    pub fn finish(self) -> String {
        self.out
    }
}

/// Escapes `&`, `<`, `>`, `"` and `'` as it writes.
struct Escaper<'a>(&'a mut String);

impl fmt::Write for Escaper<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            match c {
                '&' => self.0.push_str("&amp;"),
                '<' => self.0.push_str("&lt;"),
                '>' => self.0.push_str("&gt;"),
                '"' => self.0.push_str("&quot;"),
                '\'' => self.0.push_str("&#39;"),
                c => self.0.push(c),
            }
        }
        Ok(())
    }
}

/// `value` escaped, as a string.
pub fn escape(value: impl fmt::Display) -> String {
    let mut h = Html::new();
    h.text(value);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_markup_is_not() {
        let mut h = Html::new();
        h.markup("<p title=\"")
            .text("a\"b'<c>&")
            .markup("\">")
            .text("<script>alert(1)</script>")
            .markup("</p>");
        h.element("td class=\"n\"", 42);
        assert_eq!(
            h.finish(),
            "<p title=\"a&quot;b&#39;&lt;c&gt;&amp;\">&lt;script&gt;alert(1)&lt;/script&gt;</p>\
             <td class=\"n\">42</td>"
        );
        assert_eq!(escape("x<y"), "x&lt;y");
    }
}

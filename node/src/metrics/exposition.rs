//! The Prometheus text exposition format, version 0.0.4, written by hand.
//!
//! The format is a few lines of grammar (`# HELP`, `# TYPE`, then
//! `name{label="value"} number` lines grouped per family), so a writer of
//! our own costs less than a client library and keeps the hot path free of
//! its registry locks: the node keeps its own atomics and renders them here
//! only when scraped.

use std::fmt::Write as _;

/// The `Content-Type` of a scrape answer.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metric family's type, as `# TYPE` spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricType {
    /// Only ever goes up (resets on restart).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Cumulative `le` buckets, `_sum` and `_count`.
    Histogram,
    /// `quantile` samples, `_sum` and `_count`.
    Summary,
}

impl MetricType {
    /// The name `# TYPE` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricType::Counter => "counter",
            MetricType::Gauge => "gauge",
            MetricType::Histogram => "histogram",
            MetricType::Summary => "summary",
        }
    }
}

/// Whether `name` is a valid metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`).
pub fn valid_metric_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_' || b == b':')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

/// Whether `name` is a valid label name (`[a-zA-Z_][a-zA-Z0-9_]*`, and not
/// reserved with a leading `__`).
pub fn valid_label_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.starts_with("__")
}

/// Builds one exposition document. Call [`Self::family`] once per family,
/// then its samples, before the next family: the format wants a family's
/// lines together.
#[derive(Debug, Default)]
pub struct TextEncoder {
    out: String,
}

impl TextEncoder {
    /// An empty document.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: MetricType, help: &str) {
        debug_assert!(valid_metric_name(name), "metric name {name:?}");
        self.out.push_str("# HELP ");
        self.out.push_str(name);
        self.out.push(' ');
        for c in help.chars() {
            match c {
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                c => self.out.push(c),
            }
        }
        self.out.push_str("\n# TYPE ");
        self.out.push_str(name);
        self.out.push(' ');
        self.out.push_str(kind.as_str());
        self.out.push('\n');
    }

    /// One sample line. `name` is the family's name, or for histograms and
    /// summaries the family's name plus `_bucket`, `_sum` or `_count`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        debug_assert!(valid_metric_name(name), "metric name {name:?}");
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                debug_assert!(valid_label_name(k), "label name {k:?}");
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                push_label_value(&mut self.out, v);
                self.out.push('"');
            }
            self.out.push('}');
        }
        self.out.push(' ');
        push_value(&mut self.out, value);
        self.out.push('\n');
    }

    /// A family with a single unlabelled sample.
    pub fn single(&mut self, name: &str, kind: MetricType, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// The document so far.
    pub fn finish(self) -> String {
        self.out
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn push_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A sample value as Go's `strconv.ParseFloat` reads it: integers without a
/// fraction, `NaN`, `+Inf`, `-Inf`.
fn push_value(out: &mut String, value: f64) {
    if value.is_nan() {
        out.push_str("NaN");
    } else if value.is_infinite() {
        out.push_str(if value > 0.0 { "+Inf" } else { "-Inf" });
    } else if value.fract() == 0.0 && value.abs() < 1e15 {
        let _ = write!(out, "{}", value as i64);
    } else {
        let _ = write!(out, "{value}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_samples_and_escapes_follow_the_format() {
        let mut e = TextEncoder::new();
        e.family(
            "t_total",
            MetricType::Counter,
            "Things.\nWith \\ a newline.",
        );
        e.sample("t_total", &[("a", "x\"y\\z\nw"), ("b", "2")], 3.0);
        e.sample("t_total", &[], 0.25);
        e.single("t_gauge", MetricType::Gauge, "G.", f64::NAN);
        e.single("t_inf", MetricType::Gauge, "I.", f64::INFINITY);
        assert_eq!(
            e.finish(),
            "# HELP t_total Things.\\nWith \\\\ a newline.\n# TYPE t_total counter\n\
             t_total{a=\"x\\\"y\\\\z\\nw\",b=\"2\"} 3\nt_total 0.25\n\
             # HELP t_gauge G.\n# TYPE t_gauge gauge\nt_gauge NaN\n\
             # HELP t_inf I.\n# TYPE t_inf gauge\nt_inf +Inf\n"
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_metric_name("tollgate_decisions_total"));
        assert!(valid_metric_name("a:b_c"));
        assert!(!valid_metric_name("1abc"));
        assert!(!valid_metric_name("a-b"));
        assert!(!valid_metric_name(""));
        assert!(valid_label_name("reason"));
        assert!(!valid_label_name("__name__"));
        assert!(!valid_label_name("a:b"));
    }
}

//! Inline SVG charts: a line chart over time and a horizontal bar chart.
//! Plain SVG elements with fixed sizes, no scripts and no external assets,
//! so the page renders the same in any browser and under a strict CSP.

use std::fmt::Write as _;

use super::html::{Html, escape};

/// Colours for series, in order; chosen to stay apart on white.
pub const PALETTE: [&str; 8] = [
    "#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563",
];

const WIDTH: f64 = 560.0;
const HEIGHT: f64 = 190.0;
const LEFT: f64 = 52.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 26.0;

/// One line of a line chart.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// (x, y) points, x increasing.
    pub points: Vec<(f64, f64)>,
}

/// How a line chart labels its axes.
pub struct Axes<'a> {
    /// The chart's accessible name.
    pub title: &'a str,
    /// Largest y drawn (at least the largest point).
    pub y_max: f64,
    /// Formats a y tick.
    pub y_label: &'a dyn Fn(f64) -> String,
    /// Formats an x tick (the first and last x).
    pub x_label: &'a dyn Fn(f64) -> String,
    /// A dashed horizontal rule at this y (a limit), if any.
    pub rule: Option<f64>,
}

/// Writes a line chart of `series` (each in the next palette colour).
pub fn line_chart(out: &mut Html, axes: &Axes<'_>, series: &[Series]) {
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (x_min, x_max) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
        (lo.min(x), hi.max(x))
    });
    let y_top = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(axes.y_max, f64::max)
        .max(f64::MIN_POSITIVE);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x_span = if x_max > x_min { x_max - x_min } else { 1.0 };
    let px = |x: f64| LEFT + (x - x_min) / x_span * plot_w;
    let py = |y: f64| TOP + plot_h - (y / y_top).clamp(0.0, 1.0) * plot_h;

    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg class=\"chart line-chart\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" width=\"{WIDTH}\" height=\"{HEIGHT}\" role=\"img\" aria-label=\"{t}\"><title>{t}</title>",
        t = escape(axes.title)
    );
    for i in 0..=4 {
        let y = y_top * f64::from(i) / 4.0;
        let _ = write!(
            svg,
            "<line class=\"grid\" x1=\"{LEFT}\" x2=\"{x2}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\"/><text class=\"tick\" x=\"{lx}\" y=\"{ty:.1}\" text-anchor=\"end\">{label}</text>",
            x2 = WIDTH - RIGHT,
            yy = py(y),
            lx = LEFT - 6.0,
            ty = py(y) + 4.0,
            label = escape((axes.y_label)(y)),
        );
    }
    if let Some(rule) = axes.rule.filter(|r| *r <= y_top) {
        let _ = write!(
            svg,
            "<line class=\"rule\" x1=\"{LEFT}\" x2=\"{x2}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>",
            x2 = WIDTH - RIGHT,
            y = py(rule),
        );
    }
    if x_min.is_finite() {
        let _ = write!(
            svg,
            "<text class=\"tick\" x=\"{LEFT}\" y=\"{y}\">{a}</text><text class=\"tick\" x=\"{r}\" y=\"{y}\" text-anchor=\"end\">{b}</text>",
            y = HEIGHT - 8.0,
            r = WIDTH - RIGHT,
            a = escape((axes.x_label)(x_min)),
            b = escape((axes.x_label)(x_max)),
        );
    }
    for (i, s) in series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let mut points = String::new();
        for (x, y) in &s.points {
            let _ = write!(points, "{:.1},{:.1} ", px(*x), py(*y));
        }
        let _ = write!(
            svg,
            "<polyline class=\"series\" data-series=\"{label}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{points}\"/>",
            label = escape(&s.label),
            points = points.trim_end(),
        );
        if let Some((x, y)) = s.points.last() {
            let _ = write!(
                svg,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"/>",
                px(*x),
                py(*y)
            );
        }
    }
    svg.push_str("</svg>");
    out.markup(&svg);
}

/// Writes a horizontal bar chart of `(label, value)`, largest first as given.
pub fn bar_chart(out: &mut Html, title: &str, class: &str, bars: &[(String, u64)]) {
    const ROW: f64 = 24.0;
    const LABEL_W: f64 = 210.0;
    const VALUE_W: f64 = 70.0;
    let height = ROW * bars.len().max(1) as f64 + 8.0;
    let max = bars.iter().map(|b| b.1).max().unwrap_or(0).max(1) as f64;
    let bar_w = WIDTH - LABEL_W - VALUE_W;
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg class=\"chart bar-chart {class}\" viewBox=\"0 0 {WIDTH} {height}\" width=\"{WIDTH}\" height=\"{height}\" role=\"img\" aria-label=\"{t}\"><title>{t}</title>",
        class = escape(class),
        t = escape(title)
    );
    for (i, (label, value)) in bars.iter().enumerate() {
        let y = 4.0 + ROW * i as f64;
        let w = (*value as f64 / max * bar_w).max(1.0);
        let _ = write!(
            svg,
            "<text class=\"bar-label\" x=\"{lx}\" y=\"{ty:.1}\" text-anchor=\"end\">{l}</text><rect class=\"bar\" data-label=\"{l}\" x=\"{LABEL_W}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{h}\" fill=\"{c}\"/><text class=\"bar-value\" x=\"{vx:.1}\" y=\"{ty:.1}\">{value}</text>",
            lx = LABEL_W - 8.0,
            ty = y + ROW * 0.62,
            l = escape(label),
            h = ROW - 6.0,
            c = PALETTE[i % PALETTE.len()],
            vx = LABEL_W + w + 6.0,
        );
    }
    svg.push_str("</svg>");
    out.markup(&svg);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_escape_labels_and_draw_every_series_and_bar() {
        let mut h = Html::new();
        let axes = Axes {
            title: "use <of> \"q\"",
            y_max: 1.0,
            y_label: &|y| format!("{:.0}%", y * 100.0),
            x_label: &|x| format!("t{x}"),
            rule: Some(1.0),
        };
        line_chart(
            &mut h,
            &axes,
            &[
                Series {
                    label: "a<b".into(),
                    points: vec![(0.0, 0.1), (1.0, 0.5)],
                },
                Series {
                    label: "c".into(),
                    points: vec![(0.0, 1.5)],
                },
            ],
        );
        bar_chart(
            &mut h,
            "bars",
            "reasons",
            &[("x&y".into(), 3), ("z".into(), 1)],
        );
        let s = h.finish();
        assert_eq!(s.matches("<polyline").count(), 2);
        assert_eq!(s.matches("<rect class=\"bar\"").count(), 2);
        assert!(s.contains("data-series=\"a&lt;b\""));
        assert!(s.contains("aria-label=\"use &lt;of&gt; &quot;q&quot;\""));
        assert!(s.contains(">x&amp;y</text>"));
        assert!(!s.contains("a<b") && !s.contains("NaN"));
    }
}

//! Server-rendered SVG charts for the report page: no script, no remote fonts, each chart an
//! image with a text alternative that says what it shows. Every label is escaped; numbers are
//! formatted here.

use std::fmt::Write;

fn escape(text: &str) -> String {
    handlebars::html_escape(text)
}

/// One series of a bar chart: its name, its CSS class (its colour), and a value per category
/// (`None`: nothing to show, drawn as a dash).
pub(super) struct Series<'a> {
    pub name: &'a str,
    pub class: &'a str,
    pub values: Vec<Option<f64>>,
}

const WIDTH: f64 = 560.0;
const HEIGHT: f64 = 220.0;
const LEFT: f64 = 48.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 52.0;

/// A "nice" upper bound (1, 2 or 5 times a power of ten) at or above `value`.
fn nice(value: f64) -> f64 {
    if value <= 0.0 || !value.is_finite() {
        return 1.0;
    }
    let magnitude = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|bound| *bound >= value)
        .unwrap_or(10.0 * magnitude)
}

/// A vertical bar chart of `series` over `categories` (the periods), with a zero line, four
/// grid lines and each bar's value above it. `format` writes a value; `span` fixes the axis
/// (`(min, max)`), else it runs from 0 (or the lowest negative) to a nice maximum.
pub(super) fn bars(
    title: &str,
    categories: &[String],
    series: &[Series<'_>],
    format: &dyn Fn(f64) -> String,
    span: Option<(f64, f64)>,
) -> String {
    let values = series
        .iter()
        .flat_map(|s| s.values.iter().flatten().copied());
    let (lowest, highest) = values.fold((0.0f64, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (min, max) = span.unwrap_or_else(|| {
        let min = if lowest < 0.0 { -nice(-lowest) } else { 0.0 };
        (min, nice(highest))
    });
    let slot = (WIDTH - LEFT - RIGHT) / categories.len().max(1) as f64;
    let plot = Plot {
        min,
        max,
        slot,
        bar_w: (slot * 0.8) / series.len().max(1) as f64,
        format,
    };
    let mut svg = String::new();
    let summary = summary(title, categories, series, format);
    let _ = write!(
        svg,
        r#"<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{}"><title>{}</title>"#,
        escape(&summary),
        escape(title)
    );
    let _ = write!(
        svg,
        r#"<text class="chart-title" x="4" y="15">{}</text>"#,
        escape(title)
    );
    plot.grid(&mut svg);
    for (c, category) in categories.iter().enumerate() {
        let x0 = LEFT + plot.slot * c as f64 + plot.slot * 0.1;
        for (s, serie) in series.iter().enumerate() {
            let x = x0 + plot.bar_w * s as f64;
            plot.bar(
                &mut svg,
                x,
                category,
                serie,
                serie.values.get(c).copied().flatten(),
            );
        }
        plot.category(&mut svg, x0, category);
    }
    if series.len() > 1 {
        legend(&mut svg, series);
    }
    svg.push_str("</svg>");
    svg
}

/// A chart's axis and the width of its slots and bars.
struct Plot<'f> {
    min: f64,
    max: f64,
    /// The width of one category.
    slot: f64,
    /// The width of one bar.
    bar_w: f64,
    format: &'f dyn Fn(f64) -> String,
}

impl Plot<'_> {
    /// Where value `v` is drawn, clamped to the axis.
    fn y(&self, v: f64) -> f64 {
        let plot_h = HEIGHT - TOP - BOTTOM;
        TOP + plot_h * (self.max - v.clamp(self.min, self.max)) / (self.max - self.min)
    }

    /// Four grid lines with their values, and the zero line.
    fn grid(&self, svg: &mut String) {
        for i in 0..=4 {
            let v = self.min + (self.max - self.min) * f64::from(i) / 4.0;
            let yy = self.y(v);
            let _ = write!(
                svg,
                r#"<line class="grid" x1="{LEFT}" x2="{}" y1="{yy:.1}" y2="{yy:.1}"/><text class="axis" x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
                WIDTH - RIGHT,
                LEFT - 4.0,
                yy + 4.0,
                escape(&(self.format)(v))
            );
        }
        let zero = self.y(0.0);
        let _ = write!(
            svg,
            r#"<line class="zero" x1="{LEFT}" x2="{}" y1="{zero:.1}" y2="{zero:.1}"/>"#,
            WIDTH - RIGHT
        );
    }

    /// One bar at `x` with its value above it, or a dash for no value.
    fn bar(
        &self,
        svg: &mut String,
        x: f64,
        category: &str,
        serie: &Series<'_>,
        value: Option<f64>,
    ) {
        let zero = self.y(0.0);
        let Some(v) = value else {
            let _ = write!(
                svg,
                r#"<text class="value none" x="{:.1}" y="{:.1}" text-anchor="middle">–</text>"#,
                x + self.bar_w / 2.0,
                zero - 3.0
            );
            return;
        };
        let (top, bottom) = if v >= 0.0 {
            (self.y(v), zero)
        } else {
            (zero, self.y(v))
        };
        let label = (self.format)(v);
        let _ = write!(
            svg,
            r#"<rect class="{}" x="{x:.1}" y="{top:.1}" width="{:.1}" height="{:.1}"><title>{}: {}, {}</title></rect>"#,
            escape(serie.class),
            (self.bar_w - 2.0).max(1.0),
            (bottom - top).max(0.5),
            escape(category),
            escape(serie.name),
            escape(&label),
        );
        // The value above its bar when it fits (else in the bar's tooltip and the chart's text
        // alternative).
        if label.chars().count() as f64 * 6.0 <= self.bar_w + 4.0 {
            let _ = write!(
                svg,
                r#"<text class="value" x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                x + self.bar_w / 2.0,
                top - 3.0,
                escape(&label),
            );
        }
    }

    /// A category's label under its slot; one wider than its slot goes on two lines, broken at
    /// a hyphen.
    fn category(&self, svg: &mut String, x0: f64, category: &str) {
        let lines: Vec<&str> = match category.split_once('-') {
            Some((a, b)) if category.chars().count() as f64 * 6.5 > self.slot => vec![a, b],
            _ => vec![category],
        };
        let _ = write!(
            svg,
            r#"<text class="axis" x="{:.1}" y="{:.1}" text-anchor="middle">"#,
            x0 + self.slot * 0.4,
            HEIGHT - BOTTOM + 16.0,
        );
        for (n, line) in lines.iter().enumerate() {
            let hyphen = if n + 1 < lines.len() { "-" } else { "" };
            let _ = write!(
                svg,
                r#"<tspan x="{:.1}" dy="{}">{}{hyphen}</tspan>"#,
                x0 + self.slot * 0.4,
                if n == 0 { "0" } else { "1.1em" },
                escape(line)
            );
        }
        svg.push_str("</text>");
    }
}

/// The series' names with their colours, under the chart.
fn legend(svg: &mut String, series: &[Series<'_>]) {
    let mut x = LEFT;
    for serie in series {
        let _ = write!(
            svg,
            r#"<rect class="{}" x="{x:.1}" y="{:.1}" width="10" height="10"/><text class="axis" x="{:.1}" y="{:.1}">{}</text>"#,
            escape(serie.class),
            HEIGHT - 14.0,
            x + 14.0,
            HEIGHT - 5.0,
            escape(serie.name)
        );
        x += 24.0 + 7.0 * serie.name.chars().count() as f64;
    }
}

/// What a chart shows, in words, for screen readers.
fn summary(
    title: &str,
    categories: &[String],
    series: &[Series<'_>],
    format: &dyn Fn(f64) -> String,
) -> String {
    let mut text = format!("{title}.");
    for serie in series {
        let values: Vec<String> = categories
            .iter()
            .zip(&serie.values)
            .map(|(c, v)| format!("{c}: {}", v.map_or_else(|| "none".to_owned(), format)))
            .collect();
        let _ = write!(text, " {}: {}.", serie.name, values.join(", "));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped_and_missing_values_drawn_as_a_dash() {
        let svg = bars(
            "Rate <b>",
            &["<script>".to_owned(), "B".to_owned()],
            &[Series {
                name: "\"quoted\"",
                class: "a",
                values: vec![Some(0.5), None],
            }],
            &|v| format!("{:.0}%", v * 100.0),
            Some((0.0, 1.0)),
        );
        assert!(!svg.contains("<script>") && !svg.contains("<b>"), "{svg}");
        assert!(svg.contains("&lt;script&gt;"));
        assert!(svg.contains(">50%<"));
        assert!(svg.contains(">–<"));
        assert!(svg.contains("B: none"));
    }

    #[test]
    fn axes_end_at_nice_numbers() {
        assert_eq!(nice(0.0), 1.0);
        assert_eq!(nice(0.37), 0.5);
        assert_eq!(nice(1.0), 1.0);
        assert_eq!(nice(1234.0), 2000.0);
        assert_eq!(nice(f64::NAN), 1.0);
    }
}

//! A small SVG line chart: stacked panels sharing a time axis, with shaded phases. Enough for
//! the demo's picture without a plotting dependency.

use std::fmt::Write;

/// One line.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// CSS colour.
    pub color: &'static str,
    /// Drawn dashed (a limit, a target).
    pub dashed: bool,
    /// (x, y) points; a `None` y breaks the line.
    pub points: Vec<(f64, Option<f64>)>,
}

/// A panel: lines sharing a y axis.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Y axis label.
    pub y_label: String,
    /// The lines.
    pub series: Vec<Series>,
}

/// A shaded stretch of the x axis.
#[derive(Debug, Clone)]
pub struct Phase {
    /// Start and end, x units.
    pub from: f64,
    /// End.
    pub to: f64,
    /// Label drawn at the top.
    pub label: String,
    /// CSS fill colour.
    pub color: &'static str,
}

/// The chart.
#[derive(Debug, Clone)]
pub struct Chart {
    /// Title.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Panels, top to bottom.
    pub panels: Vec<Panel>,
    /// Shaded phases, drawn behind every panel.
    pub phases: Vec<Phase>,
}

const WIDTH: f64 = 960.0;
const PANEL_HEIGHT: f64 = 240.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 190.0;
const TOP: f64 = 50.0;
const GAP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

/// A "nice" tick step (1, 2 or 5 × 10^k) giving about `ticks` ticks over `span`.
fn nice_step(span: f64, ticks: f64) -> f64 {
    let raw = (span / ticks).max(f64::MIN_POSITIVE);
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * magnitude)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl Chart {
    /// Renders the chart as an SVG document.
    pub fn to_svg(&self) -> String {
        let points = || {
            self.panels
                .iter()
                .flat_map(|p| &p.series)
                .flat_map(|s| &s.points)
        };
        let x_max = points().map(|p| p.0).fold(1e-9, f64::max);
        let plot_w = WIDTH - LEFT - RIGHT;
        let height = TOP + self.panels.len() as f64 * (PANEL_HEIGHT + GAP) - GAP + BOTTOM;
        let x = |v: f64| LEFT + v / x_max * plot_w;
        let mut svg = String::new();
        let _ = write!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = write!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = write!(
            svg,
            r#"<text x="{}" y="28" font-size="16" font-weight="bold" text-anchor="middle">{}</text>"#,
            WIDTH / 2.0,
            escape(&self.title)
        );
        for (i, panel) in self.panels.iter().enumerate() {
            let top = TOP + i as f64 * (PANEL_HEIGHT + GAP);
            let y_max = panel
                .series
                .iter()
                .flat_map(|s| &s.points)
                .filter_map(|p| p.1)
                .fold(0.0, f64::max)
                * 1.1;
            let y_max = if y_max > 0.0 { y_max } else { 1.0 };
            let y = |v: f64| top + PANEL_HEIGHT - v / y_max * PANEL_HEIGHT;
            for phase in &self.phases {
                let _ = write!(
                    svg,
                    r#"<rect x="{:.1}" y="{top:.1}" width="{:.1}" height="{PANEL_HEIGHT}" fill="{}" opacity="0.35"/>"#,
                    x(phase.from),
                    (x(phase.to) - x(phase.from)).max(0.0),
                    phase.color
                );
                if i == 0 {
                    let _ = write!(
                        svg,
                        r#"<text x="{:.1}" y="{:.1}" fill="dimgray">{}</text>"#,
                        x(phase.from) + 4.0,
                        top + 14.0,
                        escape(&phase.label)
                    );
                }
            }
            let step = nice_step(y_max, 5.0);
            let mut tick = 0.0;
            while tick <= y_max {
                let _ = write!(
                    svg,
                    r#"<line x1="{LEFT}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="gainsboro"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                    LEFT + plot_w,
                    y(tick),
                    y(tick),
                    LEFT - 6.0,
                    y(tick) + 4.0,
                    tick
                );
                tick += step;
            }
            let _ = write!(
                svg,
                r#"<rect x="{LEFT}" y="{top:.1}" width="{plot_w:.1}" height="{PANEL_HEIGHT}" fill="none" stroke="gray"/>"#
            );
            let _ = write!(
                svg,
                r#"<text transform="translate(20,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
                top + PANEL_HEIGHT / 2.0,
                escape(&panel.y_label)
            );
            for (k, series) in panel.series.iter().enumerate() {
                let mut path = String::new();
                let mut pen_down = false;
                for &(px, py) in &series.points {
                    match py {
                        Some(v) => {
                            let _ = write!(
                                path,
                                "{}{:.1},{:.1} ",
                                if pen_down { "L" } else { "M" },
                                x(px),
                                y(v)
                            );
                            pen_down = true;
                        }
                        None => pen_down = false,
                    }
                }
                let dash = if series.dashed {
                    r#" stroke-dasharray="6,4""#
                } else {
                    ""
                };
                let _ = write!(
                    svg,
                    r#"<path d="{path}" fill="none" stroke="{}" stroke-width="2"{dash}/>"#,
                    series.color
                );
                let ly = top + 16.0 + k as f64 * 18.0;
                let lx = LEFT + plot_w + 12.0;
                let _ = write!(
                    svg,
                    r#"<line x1="{lx:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="{}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
                    lx + 22.0,
                    ly - 4.0,
                    ly - 4.0,
                    series.color,
                    lx + 28.0,
                    ly,
                    escape(&series.name)
                );
            }
        }
        let bottom = TOP + self.panels.len() as f64 * (PANEL_HEIGHT + GAP) - GAP;
        let step = nice_step(x_max, 10.0);
        let mut tick = 0.0;
        while tick <= x_max + 1e-9 {
            let _ = write!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                x(tick),
                bottom + 16.0,
                tick
            );
            tick += step;
        }
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text></svg>"#,
            LEFT + plot_w / 2.0,
            bottom + 36.0,
            escape(&self.x_label)
        );
        svg.push('\n');
        svg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(100.0, 5.0), 20.0);
        assert_eq!(nice_step(33.0, 10.0), 5.0);
        assert_eq!(nice_step(2400.0, 5.0), 500.0);
    }

    #[test]
    fn svg_has_every_series_and_phase() {
        let chart = Chart {
            title: "t <1>".into(),
            x_label: "s".into(),
            panels: vec![Panel {
                y_label: "MiB/s".into(),
                series: vec![
                    Series {
                        name: "writer".into(),
                        color: "red",
                        dashed: false,
                        points: vec![(0.0, Some(1.0)), (1.0, None), (2.0, Some(3.0))],
                    },
                    Series {
                        name: "limit".into(),
                        color: "black",
                        dashed: true,
                        points: vec![(0.0, Some(2.0)), (2.0, Some(2.0))],
                    },
                ],
            }],
            phases: vec![Phase {
                from: 1.0,
                to: 2.0,
                label: "limit".into(),
                color: "#eef",
            }],
        };
        let svg = chart.to_svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t &lt;1&gt;"));
        assert!(svg.contains(">writer<") && svg.contains(">limit<"));
        assert!(svg.contains("stroke-dasharray"));
        // The gap starts a new sub-path.
        assert_eq!(svg.matches(r#"<path d="M"#).count(), 2);
        assert!(svg.contains(" M"));
    }
}

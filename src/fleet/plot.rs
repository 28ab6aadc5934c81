//! The fleet chart: PEM server backends and heartbeat round trip p99 against agents running,
//! one line per series (direct, pooled ...), in two panels sharing the x axis, written as SVG.
//!
//! Text is SVG `<text>` in the generic `sans-serif` family, set by whatever shows the file (a
//! browser, GitHub's README view): nothing here reads a font, so drawing works the same on a
//! host without any. Without plotters' `ttf` feature the width of a label is an estimate
//! (about 0.56 em a character), used only to size the legend box; every other label is
//! anchored by the SVG itself (`text-anchor`, `dy`) and the label areas below leave room to
//! spare.
//!
//! No PNG: plotters' bitmap backend draws text only with glyphs it rasterizes from a font it
//! loaded (`ttf`: fontconfig and FreeType and the host's font files at run time; `ab_glyph`: a
//! font file compiled into the program, hundreds of kilobytes more in the agent's binary, with
//! a PNG encoder besides).

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::fsutil;

/// One measurement: how many agents ran, how many PEM server backends they held and the 99th
/// percentile of their heartbeat round trips.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub agents: f64,
    pub backends: f64,
    pub heartbeat_p99_ms: f64,
}

/// One line on both panels: a label for the legend ("direct", "pooled (pool_size 20)") and its
/// points, in any order.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<Point>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot write chart {}: PNG is not supported (its text would need a font file); use .svg",
        path.display()
    )]
    Png { path: PathBuf },
    #[error("cannot write chart {}: not an .svg file; use .svg", path.display())]
    Extension { path: PathBuf },
    #[error("cannot write chart {}: no series has a point to plot", path.display())]
    NoData { path: PathBuf },
    #[error("cannot draw chart {}: {source}", path.display())]
    Draw {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Write(#[from] fsutil::Error),
}

/// Draws `series` under `title` into `path`, which must end in `.svg`. A `.png` is refused with
/// "use .svg": drawing text into pixels would need a font file, from the host or compiled in
/// (see the module documentation), while SVG text is set by the viewer's own fonts.
///
/// The file is written beside its target and renamed over it, mode 0644, so a failed draw
/// leaves no partial file and an existing chart stays as it was until the new one replaces it.
///
/// Series without points are left out; when all are empty there is nothing to draw and that is
/// an error. Values that are not finite (a second without heartbeats) are left out of their
/// panel.
pub fn draw(path: &Path, title: &str, series: &[Series]) -> Result<(), Error> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    match ext.as_deref() {
        Some("svg") => {}
        Some("png") => return Err(Error::Png { path: path.into() }),
        _ => return Err(Error::Extension { path: path.into() }),
    }
    let lines = Lines::new(series);
    if lines.0.is_empty() {
        return Err(Error::NoData { path: path.into() });
    }
    let svg = render(title, &lines).map_err(|e| Error::Draw {
        path: path.into(),
        source: Box::new(e),
    })?;
    fsutil::Staged::write(path, svg.as_bytes(), 0o644, None)?.commit()?;
    Ok(())
}

const WIDTH: u32 = 960;
const HEIGHT: u32 = 760;
/// plotters writes an SVG font size of the given size / 1.24: about 23, 16, 13 and 14 px.
const TITLE_SIZE: f64 = 28.0;
const AXIS_TITLE_SIZE: f64 = 20.0;
const TICK_SIZE: f64 = 16.0;
const LEGEND_SIZE: f64 = 17.0;
/// More points than this and a marker on each would merge into a thick line: markers are then
/// spread over the x axis, at most one in each 1/MARKERS of its width.
const MARKERS: usize = 60;
/// More points than this are drawn with a thinner line, so that noise stays legible.
const THIN_LINE_POINTS: usize = 200;
const HEADROOM: f64 = 1.05;

/// Okabe and Ito's palette (colour-blind safe), its yellow left out as unreadable on white;
/// more series than colours reuse them in order.
const COLOURS: [RGBColor; 7] = [
    RGBColor(0x00, 0x72, 0xB2),
    RGBColor(0xD5, 0x5E, 0x00),
    RGBColor(0x00, 0x9E, 0x73),
    RGBColor(0xCC, 0x79, 0xA7),
    RGBColor(0xE6, 0x9F, 0x00),
    RGBColor(0x56, 0xB4, 0xE9),
    RGBColor(0x00, 0x00, 0x00),
];

/// The series with points, each sorted by agents, with its colour (given by its place among all
/// series, empty ones included, so that a colour means the same series in every chart of a run).
struct Lines<'a>(Vec<(&'a str, RGBColor, Vec<Point>)>);

impl<'a> Lines<'a> {
    fn new(series: &'a [Series]) -> Self {
        Lines(
            series
                .iter()
                .enumerate()
                .filter(|(_, s)| s.points.iter().any(|p| p.agents.is_finite()))
                .map(|(i, s)| {
                    let mut points = s.points.clone();
                    // Stable: points at the same agent count keep their order (time order).
                    points.sort_by(|a, b| a.agents.total_cmp(&b.agents));
                    (s.label.as_str(), COLOURS[i % COLOURS.len()], points)
                })
                .collect(),
        )
    }

    /// Each line's finite (agents, value) pairs for one panel.
    fn panel(&self, value: fn(&Point) -> f64) -> Vec<PanelLine<'a>> {
        self.0
            .iter()
            .map(|(label, colour, points)| PanelLine {
                label,
                colour: *colour,
                xy: points
                    .iter()
                    .map(|p| (p.agents, value(p)))
                    .filter(|(x, y)| x.is_finite() && y.is_finite())
                    .collect(),
            })
            .collect()
    }
}

/// One series in one panel.
struct PanelLine<'a> {
    label: &'a str,
    colour: RGBColor,
    xy: Vec<(f64, f64)>,
}

/// From 0 (or below, for a negative value) to the largest value with a little headroom; a
/// range with nothing above 0 is 0 to 1, so that the axis still has ticks.
fn axis_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (min, max) = values.fold((0.0f64, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let top = if max > 0.0 { max * HEADROOM } else { 1.0 };
    // The largest finite values would overflow with headroom.
    let top = if top.is_finite() { top } else { max };
    let bottom = if min < 0.0 { min * HEADROOM } else { 0.0 };
    let bottom = if bottom.is_finite() { bottom } else { min };
    bottom..top
}

/// Tick labels without trailing zeros: "250", "2.5", "0.25".
fn tick(v: &f64) -> String {
    if *v == 0.0 {
        return "0".into();
    }
    if v.abs() >= 1000.0 || v.fract() == 0.0 {
        return format!("{v:.0}");
    }
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.into() }
}

/// Where the legend covers the fewest points: the corners, in order of preference, each a box
/// of 40% of the width and 25% of the height.
fn legend_position(
    lines: &[PanelLine],
    x: &std::ops::Range<f64>,
    y: &std::ops::Range<f64>,
) -> SeriesLabelPosition {
    let corners = [
        (SeriesLabelPosition::UpperLeft, false, true),
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::LowerLeft, false, false),
    ];
    let fraction = |v: f64, r: &std::ops::Range<f64>| (v - r.start) / (r.end - r.start);
    let covered = |right: bool, upper: bool| {
        lines
            .iter()
            .flat_map(|l| &l.xy)
            .filter(|(px, py)| {
                let (fx, fy) = (fraction(*px, x), fraction(*py, y));
                (if right { fx >= 0.6 } else { fx <= 0.4 })
                    && (if upper { fy >= 0.75 } else { fy <= 0.25 })
            })
            .count()
    };
    corners
        .into_iter()
        .min_by_key(|(_, right, upper)| covered(*right, *upper))
        .map(|(position, _, _)| position)
        .unwrap_or(SeriesLabelPosition::UpperLeft)
}

/// The points that get a marker: all of them when few, else the first one in each 1/MARKERS of
/// the x axis.
fn markers(xy: &[(f64, f64)], x: &std::ops::Range<f64>) -> Vec<(f64, f64)> {
    if xy.len() <= MARKERS {
        return xy.to_vec();
    }
    let step = (x.end - x.start) / MARKERS as f64;
    let mut next = f64::NEG_INFINITY;
    let mut out = Vec::with_capacity(MARKERS + 1);
    for &(px, py) in xy {
        if px >= next {
            out.push((px, py));
            next = px + step;
        }
    }
    out
}

type DrawResult<T> = Result<T, DrawingAreaErrorKind<std::io::Error>>;

fn render(title: &str, lines: &Lines) -> DrawResult<String> {
    let backends = lines.panel(|p| p.backends);
    let p99 = lines.panel(|p| p.heartbeat_p99_ms);
    let x = axis_range(
        backends
            .iter()
            .chain(&p99)
            .flat_map(|l| l.xy.iter().map(|(x, _)| *x)),
    );
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let body = root.titled(title, ("sans-serif", TITLE_SIZE))?;
        let panels = body.split_evenly((2, 1));
        panel(&panels[0], &x, &backends, "PEM server backends", None)?;
        panel(
            &panels[1],
            &x,
            &p99,
            "heartbeat round trip p99 (ms)",
            Some("agents running"),
        )?;
        root.present()?;
    }
    Ok(svg)
}

fn panel(
    area: &DrawingArea<SVGBackend, Shift>,
    x: &std::ops::Range<f64>,
    lines: &[PanelLine],
    y_title: &str,
    x_title: Option<&str>,
) -> DrawResult<()> {
    let y = axis_range(lines.iter().flat_map(|l| l.xy.iter().map(|(_, y)| *y)));
    let mut chart = ChartBuilder::on(area)
        .margin_top(8)
        .margin_left(10)
        .margin_right(30)
        .margin_bottom(if x_title.is_some() { 4 } else { 0 })
        .x_label_area_size(if x_title.is_some() { 56 } else { 28 })
        .y_label_area_size(78)
        .build_cartesian_2d(x.clone(), y.clone())?;
    let mut mesh = chart.configure_mesh();
    mesh.y_desc(y_title)
        .x_label_formatter(&tick)
        .y_label_formatter(&tick)
        .x_labels(12)
        .y_labels(8)
        .axis_desc_style(("sans-serif", AXIS_TITLE_SIZE))
        .label_style(("sans-serif", TICK_SIZE))
        .bold_line_style(BLACK.mix(0.12))
        .light_line_style(TRANSPARENT);
    if let Some(t) = x_title {
        mesh.x_desc(t);
    }
    mesh.draw()?;
    let mut labelled = false;
    for PanelLine { label, colour, xy } in lines {
        if xy.is_empty() {
            continue;
        }
        let colour = *colour;
        let width = if xy.len() > THIN_LINE_POINTS { 1 } else { 2 };
        chart
            .draw_series(LineSeries::new(
                xy.iter().copied(),
                colour.stroke_width(width),
            ))?
            .label(*label)
            .legend(move |(lx, ly)| {
                EmptyElement::at((lx, ly))
                    + PathElement::new(vec![(0, 0), (22, 0)], colour.stroke_width(2))
                    + Circle::new((11, 0), 3, colour.filled())
            });
        chart.draw_series(
            markers(xy, x)
                .into_iter()
                .map(|p| Circle::new(p, 3, colour.filled())),
        )?;
        labelled = true;
    }
    if labelled {
        chart
            .configure_series_labels()
            .position(legend_position(lines, x, &y))
            .label_font(("sans-serif", LEGEND_SIZE))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .legend_area_size(30)
            .margin(12)
            .draw()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const DIRECT: &str = "direct";
    const POOLED: &str = "pooled (pool_size 20)";

    fn point(agents: f64, backends: f64, heartbeat_p99_ms: f64) -> Point {
        Point {
            agents,
            backends,
            heartbeat_p99_ms,
        }
    }

    /// Direct: a backend per agent, p99 growing with them; pooled: at most 20 backends, p99 flat.
    /// Points shuffled, as a caller may hand them over.
    fn fleet(points: usize) -> Vec<Series> {
        let mut direct = Vec::new();
        let mut pooled = Vec::new();
        for i in 0..points {
            // A fixed permutation of 0..points (7919 is prime, so coprime with most counts).
            let k = ((i * 7919) % points) as f64;
            let agents = 10.0 * (k + 1.0);
            direct.push(point(agents, agents, 3.0 + agents / 40.0));
            pooled.push(point(agents, agents.min(20.0), 4.0 + (k % 5.0) / 10.0));
        }
        vec![
            Series {
                label: DIRECT.into(),
                points: direct,
            },
            Series {
                label: POOLED.into(),
                points: pooled,
            },
        ]
    }

    fn dir_entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn hex(c: RGBColor) -> String {
        format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
    }

    /// The x coordinates of each `<polyline>` drawn in `colour`.
    fn polylines(doc: &roxmltree::Document, colour: RGBColor) -> Vec<Vec<f64>> {
        doc.descendants()
            .filter(|n| n.has_tag_name("polyline"))
            .filter(|n| n.attribute("stroke") == Some(hex(colour).as_str()))
            .map(|n| {
                n.attribute("points")
                    .unwrap()
                    .split_whitespace()
                    .map(|xy| xy.split(',').next().unwrap().parse().unwrap())
                    .collect()
            })
            .collect()
    }

    fn circles(doc: &roxmltree::Document, colour: RGBColor) -> usize {
        doc.descendants()
            .filter(|n| n.has_tag_name("circle"))
            .filter(|n| n.attribute("fill") == Some(hex(colour).as_str()))
            .count()
    }

    fn texts(doc: &roxmltree::Document) -> Vec<String> {
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .map(|n| n.text().unwrap_or_default().trim().to_string())
            .collect()
    }

    #[test]
    fn two_series_make_an_svg_with_titles_legends_and_a_sorted_line_per_series_and_panel() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.svg");
        draw(&path, "1,000 agents, direct and pooled", &fleet(12)).unwrap();

        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.trim().starts_with("<svg"), "{svg}");
        assert!(svg.trim().ends_with("</svg>"), "{svg}");
        let doc = roxmltree::Document::parse(&svg).unwrap();
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        let texts = texts(&doc);
        for t in [
            "1,000 agents, direct and pooled",
            "agents running",
            "PEM server backends",
            "heartbeat round trip p99 (ms)",
        ] {
            assert_eq!(
                texts.iter().filter(|s| *s == t).count(),
                1,
                "{t}: {texts:?}"
            );
        }
        for (label, colour) in [(DIRECT, COLOURS[0]), (POOLED, COLOURS[1])] {
            // A legend entry in each panel.
            assert_eq!(texts.iter().filter(|s| *s == label).count(), 2, "{label}");
            // The line in each panel plus its legend sample (a two-point line).
            let lines: Vec<_> = polylines(&doc, colour)
                .into_iter()
                .filter(|xs| xs.len() > 2)
                .collect();
            assert_eq!(lines.len(), 2, "{label}: {lines:?}");
            for xs in &lines {
                assert_eq!(xs.len(), 12, "{label}: {xs:?}");
                assert!(
                    xs.windows(2).all(|w| w[0] < w[1]),
                    "{label} unsorted: {xs:?}"
                );
            }
            // A marker on every point of both panels, and one in each legend entry.
            assert_eq!(circles(&doc, colour), 2 * 12 + 2, "{label}");
        }
        assert_ne!(COLOURS[0], COLOURS[1]);

        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o644);
        assert_eq!(dir_entries(dir.path()), ["fleet.svg"]);
    }

    #[test]
    fn all_series_empty_is_an_error_and_leaves_no_file_and_an_old_chart_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.svg");
        let empty = vec![
            Series {
                label: DIRECT.into(),
                points: vec![],
            },
            Series {
                label: POOLED.into(),
                points: vec![],
            },
        ];
        for series in [&empty[..], &[]] {
            let e = draw(&path, "t", series).unwrap_err();
            assert!(matches!(e, Error::NoData { .. }), "{e:?}");
            let msg = e.to_string();
            assert!(msg.contains(&*path.to_string_lossy()), "{msg}");
            assert!(msg.contains("no series has a point"), "{msg}");
            assert!(dir_entries(dir.path()).is_empty());
        }

        std::fs::write(&path, "the last run's chart").unwrap();
        draw(&path, "t", &empty).unwrap_err();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "the last run's chart"
        );
        assert_eq!(dir_entries(dir.path()), ["fleet.svg"]);
    }

    #[test]
    fn an_unknown_extension_is_an_error_naming_the_file_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["fleet.txt", "fleet", "fleet.svg.tmp", ".svg"] {
            let path = dir.path().join(name);
            let e = draw(&path, "t", &fleet(5)).unwrap_err();
            assert!(matches!(e, Error::Extension { .. }), "{name}: {e:?}");
            let msg = e.to_string();
            assert!(msg.contains(&*path.to_string_lossy()), "{msg}");
            assert!(msg.ends_with("use .svg"), "{msg}");
        }
        assert!(dir_entries(dir.path()).is_empty());
        // The extension is a file type, whatever its case.
        draw(&dir.path().join("FLEET.SVG"), "t", &fleet(5)).unwrap();
    }

    #[test]
    fn png_is_refused_saying_use_svg_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.png");
        let e = draw(&path, "t", &fleet(5)).unwrap_err();
        assert!(matches!(e, Error::Png { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains(&*path.to_string_lossy()), "{msg}");
        assert!(msg.ends_with("use .svg"), "{msg}");
        assert!(dir_entries(dir.path()).is_empty());
    }

    #[test]
    fn two_thousand_points_a_series_keep_every_point_on_the_line_and_few_markers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.svg");
        draw(&path, "t", &fleet(2000)).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let doc = roxmltree::Document::parse(&svg).unwrap();
        for colour in [COLOURS[0], COLOURS[1]] {
            let lines: Vec<_> = polylines(&doc, colour)
                .into_iter()
                .filter(|xs| xs.len() > 2)
                .collect();
            assert_eq!(lines.len(), 2);
            // Nothing dropped (points that round to one pixel may be merged by plotters).
            assert!(
                lines.iter().all(|xs| xs.len() > 500),
                "{:?}",
                lines[0].len()
            );
            let markers = circles(&doc, colour);
            assert!(
                (2 * MARKERS / 2..=2 * (MARKERS + 1) + 2).contains(&markers),
                "{markers}"
            );
        }
        assert!(svg.len() < 1 << 20, "{} bytes", svg.len());
    }

    #[test]
    fn a_series_without_points_is_left_out_and_the_others_keep_their_colours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.svg");
        let mut series = fleet(8);
        series.insert(
            0,
            Series {
                label: "never ran".into(),
                points: vec![],
            },
        );
        draw(&path, "t", &series).unwrap();
        let doc_text = std::fs::read_to_string(&path).unwrap();
        let doc = roxmltree::Document::parse(&doc_text).unwrap();
        let texts = texts(&doc);
        assert!(!texts.iter().any(|t| t == "never ran"), "{texts:?}");
        assert_eq!(texts.iter().filter(|t| *t == DIRECT).count(), 2);
        assert!(polylines(&doc, COLOURS[0]).is_empty());
        assert!(!polylines(&doc, COLOURS[1]).is_empty());
        assert!(!polylines(&doc, COLOURS[2]).is_empty());
    }

    #[test]
    fn odd_values_draw_a_chart_without_panicking() {
        let dir = tempfile::tempdir().unwrap();
        let cases: Vec<Vec<Point>> = vec![
            vec![point(0.0, 0.0, 0.0)],
            vec![point(1.0, 1.0, 1.0)],
            vec![point(5.0, 5.0, f64::NAN), point(6.0, 5.0, 2.0)],
            vec![point(f64::NAN, 1.0, 1.0), point(3.0, f64::INFINITY, 1.0)],
            vec![point(10.0, -1.0, -0.5), point(20.0, 2.0, 3.0)],
            vec![point(1e300, f64::MAX, 1e-300), point(2.0, 3.0, 4.0)],
            vec![point(0.001, 0.002, 0.003), point(0.002, 0.001, 0.004)],
        ];
        for (i, points) in cases.into_iter().enumerate() {
            let path = dir.path().join(format!("odd{i}.svg"));
            let series = [Series {
                label: "<odd & \"quoted\">".into(),
                points,
            }];
            draw(&path, "a <title> & more", &series).unwrap();
            let svg = std::fs::read_to_string(&path).unwrap();
            let doc = roxmltree::Document::parse(&svg).unwrap();
            assert!(texts(&doc).iter().any(|t| t == "<odd & \"quoted\">"), "{i}");
        }
        // Nothing finite to put on the x axis is nothing to plot.
        let e = draw(
            &dir.path().join("nan.svg"),
            "t",
            &[Series {
                label: DIRECT.into(),
                points: vec![point(f64::NAN, 1.0, 1.0)],
            }],
        )
        .unwrap_err();
        assert!(matches!(e, Error::NoData { .. }), "{e:?}");
    }

    #[test]
    fn tick_labels_have_no_trailing_zeros() {
        let labels: Vec<String> = [0.0, 250.0, 2.5, 0.25, 0.125, 1200.0, -0.0001]
            .iter()
            .map(tick)
            .collect();
        assert_eq!(labels, ["0", "250", "2.5", "0.25", "0.125", "1200", "0"]);
    }
}

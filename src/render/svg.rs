//! SVG output, laid out in pure Rust with `layout-rs`.
//!
//! The graph is built directly as a `layout` [`VisualGraph`]; we size the
//! boxes ourselves (layout-rs counts characters, we count CJK characters
//! double) and draw through a thin [`RenderBackend`] wrapper around
//! `layout`'s [`SVGWriter`] that
//! - adds the second border of terminal states and the side bars of
//!   countersign states,
//! - tracks the true bounding box (SVGWriter measures text in bytes, which
//!   makes CJK pictures far too tall),
//! - draws edge labels last, on a light backing, so that no line crosses them,
//! - and, after rendering, swaps SVGWriter's `<svg>` tag and `<style>` block
//!   (a `HashMap` in SVGWriter makes its order unstable; its font is
//!   `Times`) for deterministic ones that name CJK fonts.
//!
//! Label text is escaped by SVGWriter (`&`, `<`, `>`, quotes), so we hand it
//! raw text; the only text we write ourselves (the caption, `<title>` and the
//! no-layout fallback) is escaped here. Either way, exactly once.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Once;

use layout::adt::dag::NodeHandle;
use layout::backends::svg::SVGWriter;
use layout::core::base::Orientation;
use layout::core::color::Color;
use layout::core::format::{ClipHandle, RenderBackend};
use layout::core::geometry::Point;
use layout::core::style::{LineStyleKind, StyleAttr};
use layout::std_shapes::shapes::{Arrow, Element, LineEndKind, ShapeKind};
use layout::topo::layout::VisualGraph;

use super::{Diagram, EdgeStyle, NodeKind, display_width};

/// Font sizes, in px.
const NODE_FONT: usize = 14;
const EDGE_FONT: usize = 12;
const CAPTION_FONT: usize = 18;
/// layout-rs sometimes moves an edge label onto a connector of its own,
/// styled `StyleAttr::simple()` (15 px): draw those like edge labels too.
const MOVED_LABEL_FONT: usize = 15;
/// Width of one Latin character in em (a CJK character counts two).
const EM_PER_UNIT: f64 = 0.6;
/// Padding inside a node box, in px.
const PAD_X: f64 = 14.;
const PAD_Y: f64 = 10.;
/// Inset of the countersign side bars and of the terminal inner border.
const BAR_INSET: f64 = 8.;
const DOUBLE_INSET: f64 = 4.;
/// Room above the picture for the caption.
const CAPTION_HEIGHT: f64 = 36.;
const MARGIN: f64 = 12.;

/// The fonts the SVG asks for, CJK first.
pub(crate) const FONT_FAMILY: &str = r#""Noto Sans CJK SC", "Source Han Sans SC", "Microsoft YaHei", "PingFang SC", "Hiragino Sans GB", "Noto Color Emoji", "Segoe UI Emoji", "Apple Color Emoji", sans-serif"#;

const ORIENTATION: Orientation = Orientation::TopToBottom;

/// The most transitions laid out. layout-rs's time grows with about the
/// fourth power of a graph's size (measured with 4 transitions a state: 20
/// states 0.3 s, 40 states 4.7 s, 80 states over two minutes); the largest
/// shipped workflow has 49. A larger one gets the plain picture at once,
/// saying why; its DOT, laid out by Graphviz, has no such limit.
const MAX_LAID_OUT_EDGES: usize = 100;

pub(crate) fn render(d: &Diagram) -> String {
    if d.nodes.is_empty() {
        return fallback(d, None);
    }
    if d.edges.len() > MAX_LAID_OUT_EDGES {
        let note = format!(
            "{} transitions: too many to lay out here (at most {MAX_LAID_OUT_EDGES}); draw the DOT picture with Graphviz",
            d.edges.len()
        );
        return fallback(d, Some(&note));
    }
    // layout-rs asserts its invariants; should one ever fail, retry with
    // fewer optimisations, and finally draw a plain list.
    for (no_opt, no_layout) in [(false, false), (true, false), (true, true)] {
        if let Ok(svg) = quietly(|| layout_once(d, no_opt, no_layout)) {
            return svg;
        }
    }
    fallback(d, None)
}

thread_local! {
    /// Set while this thread runs a layout whose panics we catch.
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, catching a panic without printing it: a failed layout-rs
/// assertion is handled by a retry, not an error for the user to see. The
/// panic hook is wrapped once; it stays silent only on a thread inside
/// `quietly`, and defers to the previous hook everywhere else.
fn quietly<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    static WRAP_HOOK: Once = Once::new();
    WRAP_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let was = QUIET.with(|q| q.replace(true));
    let result = catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    result
}

fn color(hex: &str) -> Color {
    Color::fast(hex)
}

/// Pixel size of `lines` of text at `font` px.
fn text_size(lines: &[String], font: usize) -> Point {
    let widest = lines.iter().map(|l| display_width(l)).max().unwrap_or(0);
    Point::new(
        widest as f64 * EM_PER_UNIT * font as f64,
        lines.len().max(1) as f64 * font as f64,
    )
}

fn node_look(kind: NodeKind, is_start: bool) -> StyleAttr {
    let (line, fill, width, rounded) = match kind {
        NodeKind::Normal => ("#37474f", "#ffffff", 2, 8),
        NodeKind::Terminal => ("#2e7d32", "#e8f5e9", 2, 8),
        NodeKind::Countersign => ("#b7791f", "#fff4d6", 2, 0),
        NodeKind::Awaiting => ("#1565c0", "#e3f2fd", 2, 8),
        NodeKind::Dangling => ("#c62828", "#ffebee", 2, 0),
    };
    let width = if is_start { width + 1 } else { width };
    StyleAttr::new(color(line), width, Some(color(fill)), rounded, NODE_FONT)
}

fn edge_look(style: EdgeStyle) -> (StyleAttr, LineStyleKind, &'static str) {
    let (line, kind, class) = match style {
        EdgeStyle::Solid => ("#455a64", LineStyleKind::Normal, "gf-edge"),
        EdgeStyle::Dashed => ("#d84315", LineStyleKind::Dashed, "gf-edge gf-expiry"),
        EdgeStyle::Dotted => ("#5c6bc0", LineStyleKind::Dotted, "gf-edge gf-implicit"),
    };
    (
        StyleAttr::new(color(line), 2, None, 0, EDGE_FONT),
        kind,
        class,
    )
}

fn layout_once(d: &Diagram, no_opt: bool, no_layout: bool) -> String {
    let mut vg = VisualGraph::new(ORIENTATION);
    let handles: Vec<NodeHandle> = d
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let lines = n.lines();
            let text = text_size(&lines, NODE_FONT);
            let bars = if n.kind == NodeKind::Countersign {
                2. * BAR_INSET
            } else {
                0.
            };
            let size = Point::new(text.x + 2. * PAD_X + bars, text.y + 2. * PAD_Y);
            let element = Element::create_with_properties(
                ShapeKind::new_box(&lines.join("\n")),
                node_look(n.kind, d.start == Some(i)),
                ORIENTATION,
                size,
                format!("class=\"gf-node gf-{}\"", n.kind.class()),
            );
            vg.add_node(element)
        })
        .collect();

    if let Some(start) = d.start {
        let look = StyleAttr::new(color("#000000"), 1, Some(color("#000000")), 0, NODE_FONT);
        let point = Element::create_with_properties(
            ShapeKind::new_circle(""),
            look,
            ORIENTATION,
            Point::new(16., 16.),
            "class=\"gf-start\"",
        );
        let point = vg.add_node(point);
        let (look, line, class) = edge_look(EdgeStyle::Solid);
        let arrow = Arrow::with_properties(
            LineEndKind::None,
            LineEndKind::Arrow,
            line,
            "",
            &look,
            format!("class=\"{class} gf-entry\""),
            &None,
            &None,
        );
        vg.add_edge(arrow, point, handles[start]);
    }

    for e in &d.edges {
        let (look, line, class) = edge_look(e.style);
        let arrow = Arrow::with_properties(
            LineEndKind::None,
            LineEndKind::Arrow,
            line,
            &e.lines.join("\n"),
            &look,
            format!("class=\"{class}\""),
            &None,
            &None,
        );
        vg.add_edge(arrow, handles[e.from], handles[e.to]);
    }

    let mut canvas = Canvas::default();
    vg.do_it(false, no_opt, no_layout, &mut canvas);
    canvas.finish(d)
}

/// Bounding box of everything drawn.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    min: Point,
    max: Point,
}

impl Bounds {
    fn empty() -> Bounds {
        Bounds {
            min: Point::new(f64::INFINITY, f64::INFINITY),
            max: Point::new(f64::NEG_INFINITY, f64::NEG_INFINITY),
        }
    }

    fn add(&mut self, p: Point) {
        if p.x.is_finite() && p.y.is_finite() {
            self.min = Point::new(self.min.x.min(p.x), self.min.y.min(p.y));
            self.max = Point::new(self.max.x.max(p.x), self.max.y.max(p.y));
        }
    }

    fn add_rect(&mut self, top_left: Point, size: Point) {
        self.add(top_left);
        self.add(top_left.add(size));
    }

    /// (x, y, width, height) with a margin, the caption above, and room for
    /// the caption's own width.
    fn view(&self, caption_width: f64) -> (f64, f64, f64, f64) {
        let (min, max) = if self.min.x <= self.max.x {
            (self.min, self.max)
        } else {
            (Point::zero(), Point::zero())
        };
        let x = min.x - MARGIN;
        let y = min.y - MARGIN - CAPTION_HEIGHT;
        let w = (max.x - min.x).max(caption_width) + 2. * MARGIN;
        let h = max.y - min.y + 2. * MARGIN + CAPTION_HEIGHT;
        (x, y, w, h)
    }
}

/// A [`RenderBackend`] that draws through [`SVGWriter`], adding the extra
/// strokes of some node kinds and tracking the real bounding box.
#[derive(Debug)]
struct Canvas {
    inner: SVGWriter,
    bounds: Bounds,
    /// Edge labels, drawn last (on a light backing) so that no line crosses
    /// them.
    labels: Vec<(Point, String, StyleAttr)>,
}

impl Default for Canvas {
    fn default() -> Self {
        Canvas {
            inner: SVGWriter::new(),
            bounds: Bounds::empty(),
            labels: Vec::new(),
        }
    }
}

impl RenderBackend for Canvas {
    fn draw_rect(
        &mut self,
        xy: Point,
        size: Point,
        look: &StyleAttr,
        properties: Option<String>,
        clip: Option<ClipHandle>,
    ) {
        self.bounds.add_rect(xy, size);
        let props = properties.clone().unwrap_or_default();
        self.inner.draw_rect(xy, size, look, properties, clip);
        let mut thin = look.clone();
        thin.fill_color = None;
        thin.line_width = 1;
        if props.contains("gf-terminal") && size.x > 4. * DOUBLE_INSET && size.y > 4. * DOUBLE_INSET
        {
            thin.rounded = look.rounded.saturating_sub(DOUBLE_INSET as usize);
            self.inner.draw_rect(
                xy.add(Point::splat(DOUBLE_INSET)),
                size.sub(Point::splat(2. * DOUBLE_INSET)),
                &thin,
                Some("class=\"gf-inner\"".to_string()),
                None,
            );
        }
        if props.contains("gf-countersign") && size.x > 4. * BAR_INSET {
            for x in [xy.x + BAR_INSET, xy.x + size.x - BAR_INSET] {
                self.inner.draw_line(
                    Point::new(x, xy.y),
                    Point::new(x, xy.y + size.y),
                    &thin,
                    Some("class=\"gf-bar\"".to_string()),
                );
            }
        }
    }

    fn draw_line(
        &mut self,
        start: Point,
        stop: Point,
        look: &StyleAttr,
        properties: Option<String>,
    ) {
        self.bounds.add(start);
        self.bounds.add(stop);
        self.inner.draw_line(start, stop, look, properties);
    }

    fn draw_circle(
        &mut self,
        xy: Point,
        size: Point,
        look: &StyleAttr,
        properties: Option<String>,
    ) {
        self.bounds.add_rect(xy.sub(size.scale(0.5)), size);
        self.inner.draw_circle(xy, size, look, properties);
    }

    fn draw_text(&mut self, xy: Point, text: &str, look: &StyleAttr) {
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if !lines.is_empty() {
            let size = text_size(&lines, look.font_size);
            self.bounds.add_rect(xy.sub(size.scale(0.5)), size);
        }
        // Node text is NODE_FONT; anything else is an edge label.
        if look.font_size != NODE_FONT && !lines.is_empty() {
            self.labels.push((xy, text.to_string(), look.clone()));
        } else {
            self.inner.draw_text(xy, text, look);
        }
    }

    fn draw_arrow(
        &mut self,
        path: &[(Point, Point)],
        dashed: bool,
        head: (bool, bool),
        look: &StyleAttr,
        properties: Option<String>,
        text: &str,
    ) {
        for (a, b) in path {
            self.bounds.add(*a);
            self.bounds.add(*b);
        }
        self.inner
            .draw_arrow(path, dashed, head, look, properties, text);
    }

    fn create_clip(&mut self, xy: Point, size: Point, rounded_px: usize) -> ClipHandle {
        self.inner.create_clip(xy, size, rounded_px)
    }
}

/// Escapes text and attribute values we write ourselves.
fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            _ => out.push(c),
        }
    }
    out
}

fn caption(d: &Diagram) -> String {
    match (d.title.is_empty(), d.name.is_empty()) {
        (true, true) => "(unnamed workflow)".to_string(),
        (true, false) => d.name.clone(),
        (false, true) => d.title.clone(),
        (false, false) => format!("{} · {}", d.title, d.name),
    }
}

fn style_block() -> String {
    format!(
        "<style>\n\
         svg {{ font-family: {FONT_FAMILY}; }}\n\
         text {{ font-family: {FONT_FAMILY}; fill: #1f2933; }}\n\
         .a{NODE_FONT} {{ font-size: {NODE_FONT}px; }}\n\
         .a{EDGE_FONT}, .a{MOVED_LABEL_FONT} {{ font-size: {EDGE_FONT}px; paint-order: stroke; stroke: #ffffff; stroke-width: 3px; stroke-linejoin: round; }}\n\
         .gf-caption {{ font-size: {CAPTION_FONT}px; font-weight: bold; }}\n\
         .gf-label rect {{ fill-opacity: 0.85; }}\n\
         .gf-awaiting rect {{ stroke-dasharray: 7 4; }}\n\
         .gf-dangling rect {{ stroke-dasharray: 3 3; }}\n\
         .gf-expiry path {{ stroke-dasharray: 8 4; }}\n\
         .gf-implicit path {{ stroke-dasharray: 2 4; stroke-linecap: round; }}\n\
         </style>\n"
    )
}

/// The `<svg>` open tag, `<title>`, style, background and caption.
fn head(d: &Diagram, bounds: &Bounds) -> String {
    let caption = caption(d);
    let caption_width = display_width(&caption) as f64 * EM_PER_UNIT * CAPTION_FONT as f64;
    let (x, y, w, h) = bounds.view(caption_width);
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w:.0}\" height=\"{h:.0}\" \
         viewBox=\"{x:.1} {y:.1} {w:.1} {h:.1}\" font-family='{FONT_FAMILY}'>\n\
         <title>{title}</title>\n\
         {style}\
         <rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" fill=\"#ffffff\"/>\n\
         <text class=\"gf-caption\" x=\"{cx:.1}\" y=\"{cy:.1}\">{title}</text>\n",
        title = xml_escape(&caption),
        style = style_block(),
        cx = x + MARGIN,
        cy = y + MARGIN + CAPTION_FONT as f64,
    )
}

impl Canvas {
    fn finish(mut self, d: &Diagram) -> String {
        let backing = StyleAttr::new(
            Color::transparent(),
            0,
            Some(color("#ffffff")),
            3,
            EDGE_FONT,
        );
        for (xy, text, look) in std::mem::take(&mut self.labels) {
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            let size = text_size(&lines, EDGE_FONT).add(Point::new(6., 4.));
            self.inner.draw_rect(
                xy.sub(size.scale(0.5)),
                size,
                &backing,
                Some("class=\"gf-label\"".to_string()),
                None,
            );
            self.inner.draw_text(xy, &text, &look);
        }
        let raw = self.inner.finalize();
        let head = head(d, &self.bounds);
        // SVGWriter's output: header, `<svg …>`, defs, `<style>…</style>`,
        // clip paths, body, `</svg>`. Keep the header, defs, clips and body.
        let (Some(svg_at), Some(style_at), Some(style_end)) = (
            raw.find("<svg"),
            raw.find("<style>"),
            raw.find("</style>\n"),
        ) else {
            return raw;
        };
        let Some(tag_len) = raw[svg_at..].find('>') else {
            return raw;
        };
        let header = &raw[..svg_at];
        let defs = &raw[svg_at + tag_len + 1..style_at];
        let body = &raw[style_end + "</style>\n".len()..];
        let mut out = String::with_capacity(raw.len() + head.len());
        out.push_str(header);
        out.push('\n');
        out.push_str(&head);
        out.push_str(defs.trim_start());
        out.push('\n');
        out.push_str(body);
        out.push('\n');
        out
    }
}

/// A plain picture for when layout is impossible: the nodes stacked, the
/// edges listed under them, after a `note` saying why if there is one.
fn fallback(d: &Diagram, note: Option<&str>) -> String {
    let mut bounds = Bounds::empty();
    let mut body = String::new();
    let mut y = 0.;
    if let Some(note) = note {
        let lines = [note.to_owned()];
        let size = text_size(&lines, EDGE_FONT);
        bounds.add_rect(Point::zero(), size);
        body.push_str(&text_lines(0., 0., &lines, EDGE_FONT));
        y += size.y + 16.;
    }
    for n in &d.nodes {
        let lines = n.lines();
        let text = text_size(&lines, NODE_FONT);
        let size = Point::new(text.x + 2. * PAD_X, text.y + 2. * PAD_Y);
        let look = node_look(n.kind, false);
        bounds.add_rect(Point::new(0., y), size);
        body.push_str(&format!(
            "<rect class=\"gf-node gf-{}\" x=\"0\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" rx=\"{}\" fill=\"{}\" stroke=\"{}\" stroke-width=\"2\"/>\n",
            n.kind.class(),
            size.x,
            size.y,
            look.rounded,
            look.fill_color.unwrap_or_else(Color::transparent).to_web_color(),
            look.line_color.to_web_color(),
        ));
        body.push_str(&text_lines(PAD_X, y + PAD_Y, &lines, NODE_FONT));
        y += size.y + 16.;
    }
    let edges: Vec<String> = d
        .edges
        .iter()
        .map(|e| {
            format!(
                "{} → {}: {}",
                d.nodes[e.from].name,
                d.nodes[e.to].name,
                e.lines.join(" / ")
            )
        })
        .collect();
    if !edges.is_empty() {
        let size = text_size(&edges, EDGE_FONT);
        bounds.add_rect(Point::new(0., y), size);
        body.push_str(&text_lines(0., y, &edges, EDGE_FONT));
    }
    if d.nodes.is_empty() && d.edges.is_empty() {
        bounds.add_rect(Point::zero(), Point::new(200., 20.));
    }
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"no\"?>\n{}{body}</svg>\n",
        head(d, &bounds)
    )
}

fn text_lines(x: f64, top: f64, lines: &[String], font: usize) -> String {
    let mut out = format!("<text class=\"a{font}\" x=\"{x:.1}\" y=\"{top:.1}\">");
    for line in lines {
        out.push_str(&format!(
            "<tspan x=\"{x:.1}\" dy=\"1em\">{}</tspan>",
            xml_escape(line)
        ));
    }
    out.push_str("</text>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::tests::{empty, sample};
    use crate::render::{Format, render as render_any};

    fn check_well_formed(svg: &str) {
        assert!(
            svg.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\""),
            "{svg}"
        );
        assert!(svg.contains("<svg "));
        assert_eq!(svg.matches("<svg").count(), 1);
        assert_eq!(svg.matches("</svg>").count(), 1);
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains(FONT_FAMILY));
        assert!(svg.contains("Noto Sans CJK SC"));
        assert!(!svg.contains("Times"));
        // Every `&` starts an entity.
        for (i, _) in svg.match_indices('&') {
            let rest = &svg[i..];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                    .iter()
                    .any(|e| rest.starts_with(e)),
                "bare & at {}",
                &svg[i..(i + 20).min(svg.len())]
            );
        }
        // Tags balance for the elements we and SVGWriter write.
        for tag in ["g", "text", "style", "defs", "marker", "clipPath", "title"] {
            let open =
                svg.matches(&format!("<{tag}>")).count() + svg.matches(&format!("<{tag} ")).count();
            assert_eq!(
                open,
                svg.matches(&format!("</{tag}>")).count(),
                "<{tag}> balanced"
            );
        }
    }

    #[test]
    fn sample_svg() {
        let svg = render_any(&sample(), Format::Svg);
        check_well_formed(&svg);
        for title in [
            "已提交",
            "县级办理",
            "等待子流程",
            "联合会签",
            "办结",
            "不予许可",
            "许可联办",
        ] {
            assert!(svg.contains(title), "{title}");
        }
        assert!(svg.contains("county_handling"));
        assert!(svg.contains("⏱ 5 working days → escalate"));
        // Guard escaped exactly once.
        assert!(svg.contains("[guard] vars.a &lt; 3 &amp;&amp; vars.b"));
        assert!(!svg.contains("&amp;lt;") && !svg.contains("&amp;amp;"));
        assert!(svg.contains("&quot;permit_check&quot;"));
        // Kinds.
        assert!(svg.contains("class=\"gf-node gf-terminal\""));
        assert!(svg.contains("class=\"gf-inner\""));
        assert!(svg.contains("class=\"gf-node gf-countersign\""));
        assert_eq!(svg.matches("class=\"gf-bar\"").count(), 2);
        assert!(svg.contains("class=\"gf-node gf-awaiting\""));
        assert!(svg.contains("class=\"gf-node gf-dangling\""));
        assert!(svg.contains("class=\"gf-start\""));
        assert!(svg.contains("class=\"gf-edge gf-expiry\""));
        assert_eq!(svg.matches("class=\"gf-edge gf-implicit\"").count(), 3);
    }

    #[test]
    fn cjk_boxes_are_wide_enough() {
        let wide = text_size(&["县级办理县级办理".to_string()], NODE_FONT);
        let narrow = text_size(&["county_handling1".to_string()], NODE_FONT);
        assert_eq!(wide.x, narrow.x);
        assert!(wide.x >= 8. * NODE_FONT as f64);
    }

    /// Regression: the SVG of a workflow of 80 states and 320 transitions
    /// was still being laid out after two minutes (by `graph`, `validate
    /// --draw`, and the server's RenderWorkflow on one of its threads).
    /// Past the limit the plain picture comes at once, saying why.
    #[test]
    fn a_workflow_too_large_to_lay_out_gets_the_plain_picture_at_once() {
        let mut d = Diagram::from_workflow(&sample());
        let first = d.edges[0].clone();
        d.edges = (0..=MAX_LAID_OUT_EDGES).map(|_| first.clone()).collect();
        let svg = render(&d);
        check_well_formed(&svg);
        assert!(
            svg.contains(&format!(
                "{} transitions: too many to lay out here",
                MAX_LAID_OUT_EDGES + 1
            )),
            "{svg}"
        );
        assert!(svg.contains("county_handling"), "every state is listed");
    }

    #[test]
    fn empty_and_fallback_svg() {
        check_well_formed(&render_any(&empty(), Format::Svg));
        let d = Diagram::from_workflow(&sample());
        let svg = fallback(&d, None);
        check_well_formed(&svg);
        assert!(svg.contains("vars.a &lt; 3 &amp;&amp; vars.b"));
    }
}

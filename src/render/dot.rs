//! Graphviz DOT output.

use std::fmt::Write;

use super::{Diagram, EdgeStyle, NodeKind};

/// Fonts for Graphviz (a Pango/fontconfig family list).
const FONT: &str = "Noto Sans CJK SC,Source Han Sans SC,Microsoft YaHei,PingFang SC,sans-serif";

/// Escapes `s` for use inside a double-quoted DOT string: backslashes and
/// quotes are escaped, line breaks become spaces.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' | '\r' => out.push(' '),
            _ => out.push(c),
        }
    }
    out
}

/// A quoted DOT id or label made of `lines` (joined by centred line breaks).
fn quoted(lines: &[String]) -> String {
    let parts: Vec<String> = lines.iter().map(|l| escape(l)).collect();
    format!("\"{}\"", parts.join("\\n"))
}

fn id(name: &str) -> String {
    format!("\"{}\"", escape(name))
}

fn node_attrs(kind: NodeKind, is_start: bool) -> String {
    let pen = if is_start { ", penwidth=2" } else { "" };
    let attrs = match kind {
        NodeKind::Normal => {
            r##"shape=box, style="rounded,filled", fillcolor="#ffffff", color="#37474f""##
        }
        NodeKind::Terminal => {
            r##"shape=box, style="rounded,filled", peripheries=2, fillcolor="#e8f5e9", color="#2e7d32""##
        }
        NodeKind::Countersign => {
            r##"shape=box3d, style="filled,bold", fillcolor="#fff4d6", color="#b7791f""##
        }
        NodeKind::Awaiting => {
            r##"shape=box, style="rounded,filled,dashed", fillcolor="#e3f2fd", color="#1565c0", penwidth=1.5"##
        }
        NodeKind::Dangling => {
            r##"shape=box, style="dashed", color="#c62828", fontcolor="#c62828""##
        }
    };
    format!("{attrs}{pen}")
}

pub(crate) fn render(d: &Diagram) -> String {
    let mut out = String::new();
    let graph_name = if d.name.is_empty() {
        "workflow"
    } else {
        &d.name
    };
    let caption = if d.title.is_empty() {
        d.name.clone()
    } else {
        format!("{} ({})", d.title, d.name)
    };
    let _ = writeln!(out, "digraph {} {{", id(graph_name));
    let _ = writeln!(
        out,
        "  graph [charset=\"UTF-8\", rankdir=LR, fontname=\"{FONT}\", label={}, labelloc=t, fontsize=16, nodesep=0.35, ranksep=0.5];",
        id(&caption)
    );
    let _ = writeln!(
        out,
        "  node [fontname=\"{FONT}\", fontsize=12, margin=\"0.15,0.08\"];"
    );
    let _ = writeln!(
        out,
        "  edge [fontname=\"{FONT}\", fontsize=10, color=\"#455a64\"];"
    );

    // The start point gets an id no state has.
    let mut start_id = "__start".to_string();
    while d.nodes.iter().any(|n| n.name == start_id) {
        start_id.push('_');
    }
    if let Some(start) = d.start {
        let _ = writeln!(
            out,
            "  {} [shape=point, width=0.16, label=\"\", color=\"#000000\"];",
            id(&start_id)
        );
        let _ = writeln!(out, "  {} -> {};", id(&start_id), id(&d.nodes[start].name));
    }

    for (i, n) in d.nodes.iter().enumerate() {
        let _ = writeln!(
            out,
            "  {} [label={}, {}];",
            id(&n.name),
            quoted(&n.lines()),
            node_attrs(n.kind, d.start == Some(i))
        );
    }

    for e in &d.edges {
        let style = match e.style {
            EdgeStyle::Solid => String::new(),
            EdgeStyle::Dashed => {
                ", style=dashed, color=\"#d84315\", fontcolor=\"#d84315\"".to_string()
            }
            EdgeStyle::Dotted => {
                ", style=dotted, color=\"#5c6bc0\", fontcolor=\"#3949ab\"".to_string()
            }
        };
        let _ = writeln!(
            out,
            "  {} -> {} [label={}{style}];",
            id(&d.nodes[e.from].name),
            id(&d.nodes[e.to].name),
            quoted(&e.lines)
        );
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::tests::{empty, sample};
    use crate::render::{Format, render as render_any};

    #[test]
    fn escape_quotes_and_backslashes() {
        assert_eq!(escape(r#"a "b" \c"#), r#"a \"b\" \\c"#);
        assert_eq!(escape("x\ny"), "x y");
    }

    #[test]
    fn sample_dot() {
        let dot = render_any(&sample(), Format::Dot);
        assert!(dot.starts_with("digraph \"permit_flow\" {\n"));
        assert!(dot.trim_end().ends_with('}'));
        assert!(dot.contains("charset=\"UTF-8\""));
        assert!(dot.contains("rankdir=LR"));
        // Start point and entry arrow.
        assert!(dot.contains("\"__start\" [shape=point"));
        assert!(dot.contains("\"__start\" -> \"submitted\";"));
        // Nodes: title, name, deadline, reminders.
        assert!(dot.contains(
            "\"county_handling\" [label=\"县级办理\\ncounty_handling\\n⏱ 5 working days → escalate\\n↳ remind 2 working days, 4 hours before\""
        ));
        // Terminal: double border, outcome.
        assert!(dot.contains("\"done\" [label=\"办结\\ndone\\n◉ outcome: approved\", shape=box, style=\"rounded,filled\", peripheries=2"));
        // Countersign and await.
        assert!(
            dot.contains("会签 countersign: county, city\\nquorum: ≥2 of 2 (veto)\", shape=box3d")
        );
        assert!(dot.contains(
            "⇇ wait All children → joint_review\", shape=box, style=\"rounded,filled,dashed\""
        ));
        // Dangling target.
        assert!(dot.contains(
            "\"nowhere\" [label=\"nowhere\\n(undefined state)\", shape=box, style=\"dashed\""
        ));
        // Edges.
        assert!(dot.contains(
            "\"submitted\" -> \"county_handling\" [label=\"classify [work_team]\\n分类\"];"
        ));
        assert!(dot.contains(
            "\"county_handling\" -> \"joint_review\" [label=\"⏱ escalate\", style=dashed"
        ));
        assert!(dot.contains(
            "\"county_handling\" -> \"awaiting_permits\" [label=\"fan_out [county]\\n分发许可\\n[guard] vars.a < 3 && vars.b\\n⇉ spawn \\\"permit_check\\\" × vars.permits\"];"
        ));
        assert!(
            dot.contains("\"joint_review\" -> \"done\" [label=\"sign (≥2 of 2)\", style=dotted")
        );
        assert!(dot.contains("\"joint_review\" -> \"refused\" [label=\"reject\", style=dotted"));
        assert!(dot.contains("\"awaiting_permits\" -> \"joint_review\" [label=\"children settled (all)\", style=dotted"));
        // Quotes and backslashes of a guard escaped, and shortened.
        assert!(dot.contains("[guard] vars.path == 'C:\\\\tmp' || vars.kind == \\\"…\"];"));
        // One edge line per transition: 6 + 2 + 1 + the entry arrow.
        assert_eq!(dot.lines().filter(|l| l.contains(" -> ")).count(), 10);
    }

    #[test]
    fn empty_dot() {
        let dot = render_any(&empty(), Format::Dot);
        assert!(dot.starts_with("digraph \"workflow\" {"));
        assert!(!dot.contains("__start"));
    }

    #[test]
    fn start_id_does_not_collide() {
        let mut wf = sample();
        wf.states[0].name = "__start".into();
        wf.start = "__start".into();
        let dot = render_any(&wf, Format::Dot);
        assert!(dot.contains("\"__start_\" -> \"__start\";"));
    }
}

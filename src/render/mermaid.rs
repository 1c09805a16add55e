//! Mermaid `stateDiagram-v2` output.
//!
//! State ids are the ASCII state names (other characters become `_`, and a
//! name that clashes with a Mermaid keyword gets an `s_` prefix). Text that
//! Mermaid's lexer would misread (`:`, `;`, `"`, `#`, `%`, `<`, `>`, `&`, the
//! word `direction`) is written as Mermaid entity codes (`#58;` …), which
//! Mermaid decodes when it draws.

use std::collections::BTreeSet;
use std::fmt::Write;

use super::{Diagram, EdgeStyle, NodeKind};

/// Escapes label text for Mermaid: one line, entity codes for the characters
/// its lexer treats specially.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        // `.*direction\s+LR` anywhere on a line is a direction statement.
        if (c == 'd' || c == 'D') && starts_with_ci(&chars[i..], "direction") {
            out.push_str(if c == 'd' { "#100;" } else { "#68;" });
            i += 1;
            continue;
        }
        match c {
            ':' => out.push_str("#58;"),
            ';' => out.push_str("#59;"),
            '"' => out.push_str("#34;"),
            '#' => out.push_str("#35;"),
            '%' => out.push_str("#37;"),
            '&' => out.push_str("#38;"),
            '<' => out.push_str("#60;"),
            '>' => out.push_str("#62;"),
            '\n' | '\r' | '\t' => out.push(' '),
            _ => out.push(c),
        }
        i += 1;
    }
    out
}

fn starts_with_ci(chars: &[char], word: &str) -> bool {
    let n = word.chars().count();
    chars.len() >= n
        && chars[..n]
            .iter()
            .zip(word.chars())
            .all(|(a, b)| a.to_ascii_lowercase() == b)
}

/// Words Mermaid's state-diagram lexer reads as keywords where an id is
/// expected.
const KEYWORDS: &[&str] = &[
    "state",
    "note",
    "class",
    "classdef",
    "scale",
    "hide",
    "direction",
    "acctitle",
    "accdescr",
    "statediagram",
    "end",
];

/// An ASCII Mermaid id for a state name.
fn base_id(name: &str) -> String {
    let mut id: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if id.is_empty() {
        id.push('_');
    }
    let lower = id.to_ascii_lowercase();
    if lower.starts_with("default") || KEYWORDS.contains(&lower.as_str()) {
        id.insert_str(0, "s_");
    }
    id
}

/// One unique id per node, in node order.
fn ids(d: &Diagram) -> Vec<String> {
    let mut taken = BTreeSet::new();
    let mut out = Vec::with_capacity(d.nodes.len());
    for n in &d.nodes {
        let base = base_id(&n.name);
        let mut id = base.clone();
        let mut k = 2;
        while taken.contains(&id) {
            id = format!("{base}_{k}");
            k += 1;
        }
        taken.insert(id.clone());
        out.push(id);
    }
    out
}

const CLASS_DEFS: &[(NodeKind, &str)] = &[
    (
        NodeKind::Terminal,
        "fill:#e8f5e9,stroke:#2e7d32,stroke-width:4px",
    ),
    (
        NodeKind::Countersign,
        "fill:#fff4d6,stroke:#b7791f,stroke-width:3px",
    ),
    (
        NodeKind::Awaiting,
        "fill:#e3f2fd,stroke:#1565c0,stroke-width:2px,stroke-dasharray:6 3",
    ),
    (
        NodeKind::Dangling,
        "fill:#ffebee,stroke:#c62828,stroke-width:2px,stroke-dasharray:3 3",
    ),
];

pub(crate) fn render(d: &Diagram) -> String {
    let ids = ids(d);
    let mut out = String::new();
    out.push_str("stateDiagram-v2\n");
    out.push_str("    direction LR\n");
    if !d.title.is_empty() || !d.name.is_empty() {
        let _ = writeln!(out, "    %% {} ({})", d.title, d.name);
    }
    for (kind, style) in CLASS_DEFS {
        let _ = writeln!(out, "    classDef {} {style}", kind.class());
    }

    for (n, id) in d.nodes.iter().zip(&ids) {
        let title = if n.title.is_empty() {
            &n.name
        } else {
            &n.title
        };
        let _ = writeln!(out, "    state \"{}\" as {id}", escape(title));
        let mut details = Vec::new();
        if n.title != n.name && !n.title.is_empty() {
            details.push(n.name.clone());
        }
        details.extend(n.details.iter().cloned());
        for line in details {
            let line = escape(&line);
            if !line.trim().is_empty() {
                let _ = writeln!(out, "    {id} : {line}");
            }
        }
    }

    if let Some(start) = d.start {
        let _ = writeln!(out, "    [*] --> {}", ids[start]);
    }
    for e in &d.edges {
        let mut lines: Vec<String> = e.lines.iter().map(|l| escape(l)).collect();
        match e.style {
            EdgeStyle::Solid => {}
            // Mermaid cannot dash a transition: say it in the label instead.
            EdgeStyle::Dashed => lines[0].push_str(" (expiry)"),
            EdgeStyle::Dotted => lines[0] = format!("⋯ {}", lines[0]),
        }
        let label = lines.join("<br/>");
        if label.trim().is_empty() {
            let _ = writeln!(out, "    {} --> {}", ids[e.from], ids[e.to]);
        } else {
            let _ = writeln!(out, "    {} --> {} : {label}", ids[e.from], ids[e.to]);
        }
    }
    for (n, id) in d.nodes.iter().zip(&ids) {
        if n.kind == NodeKind::Terminal {
            let _ = writeln!(out, "    {id} --> [*]");
        }
    }

    for (kind, _) in CLASS_DEFS {
        let members: Vec<&str> = d
            .nodes
            .iter()
            .zip(&ids)
            .filter(|(n, _)| n.kind == *kind)
            .map(|(_, id)| id.as_str())
            .collect();
        if !members.is_empty() {
            let _ = writeln!(out, "    class {} {}", members.join(","), kind.class());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::tests::{empty, sample};
    use crate::render::{Format, render as render_any};

    #[test]
    fn escapes() {
        assert_eq!(
            escape("a: b; \"c\" #d 50%"),
            "a#58; b#59; #34;c#34; #35;d 50#37;"
        );
        assert_eq!(escape("x < 3 && y > 2"), "x #60; 3 #38;#38; y #62; 2");
        assert_eq!(escape("Direction LR"), "#68;irection LR");
        assert_eq!(escape("县级办理\n办结"), "县级办理 办结");
    }

    #[test]
    fn ids_are_ascii_and_unique() {
        assert_eq!(base_id("county_handling"), "county_handling");
        assert_eq!(base_id("a-b c"), "a_b_c");
        assert_eq!(base_id("state"), "s_state");
        assert_eq!(base_id("default_x"), "s_default_x");
        assert_eq!(base_id("县级"), "__");
        assert_eq!(base_id(""), "_");
    }

    #[test]
    fn sample_mermaid() {
        let m = render_any(&sample(), Format::Mermaid);
        assert!(m.starts_with("stateDiagram-v2\n"));
        assert!(m.contains("    state \"县级办理\" as county_handling\n"));
        assert!(m.contains("    county_handling : county_handling\n"));
        assert!(m.contains("    county_handling : ⏱ 5 working days → escalate\n"));
        assert!(m.contains("    done : ◉ outcome#58; approved\n"));
        assert!(m.contains("    joint_review : 会签 countersign#58; county, city\n"));
        assert!(m.contains("    awaiting_permits : ⇇ wait All children → joint_review\n"));
        assert!(m.contains("    [*] --> submitted\n"));
        assert!(m.contains("    submitted --> county_handling : classify [work_team]<br/>分类\n"));
        assert!(m.contains("    county_handling --> joint_review : ⏱ escalate (expiry)\n"));
        assert!(m.contains("[guard] vars.a #60; 3 #38;#38; vars.b<br/>⇉ spawn #34;permit_check#34; × vars.permits\n"));
        assert!(m.contains("    joint_review --> done : ⋯ sign (≥2 of 2)\n"));
        assert!(m.contains("    joint_review --> refused : ⋯ reject\n"));
        assert!(m.contains("    awaiting_permits --> joint_review : ⋯ children settled (all)\n"));
        assert!(m.contains("    done --> [*]\n"));
        assert!(m.contains("    refused --> [*]\n"));
        assert!(!m.contains("submitted --> [*]"));
        assert!(m.contains("    classDef terminal "));
        assert!(m.contains("    classDef countersign "));
        assert!(m.contains("    classDef awaiting "));
        assert!(m.contains("    class done,refused,withdrawn terminal\n"));
        assert!(m.contains("    class joint_review countersign\n"));
        assert!(m.contains("    class awaiting_permits awaiting\n"));
        assert!(m.contains("    class nowhere dangling\n"));
        // No raw character Mermaid's lexer dislikes inside a label.
        for line in m.lines() {
            if let Some((_, label)) = line.split_once(" : ") {
                let bare = strip_entities(label);
                assert!(
                    !bare.contains(':') && !bare.contains(';') && !bare.contains('"'),
                    "{line}"
                );
            }
        }
    }

    /// `label` without its `#123;` entity codes.
    fn strip_entities(label: &str) -> String {
        let mut out = String::new();
        let mut rest = label;
        while let Some(i) = rest.find('#') {
            out.push_str(&rest[..i]);
            let tail = &rest[i + 1..];
            let digits = tail.chars().take_while(|c| c.is_ascii_digit()).count();
            if digits > 0 && tail[digits..].starts_with(';') {
                rest = &tail[digits + 1..];
            } else {
                out.push('#');
                rest = tail;
            }
        }
        out.push_str(rest);
        out
    }

    #[test]
    fn empty_mermaid() {
        assert!(render_any(&empty(), Format::Mermaid).starts_with("stateDiagram-v2\n"));
    }
}

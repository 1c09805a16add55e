//! Pictures of workflows: DOT, Mermaid and SVG.
//!
//! [`render`] turns a [`Workflow`] into text in one of three [`Format`]s. All
//! three share one reading of the workflow ([`Diagram`]): one node per state
//! (plus a dangling node for every target that names no state), one edge per
//! transition, and the implicit edges of countersign and children-await
//! states. Output is deterministic: the same workflow gives the same bytes.
//!
//! What the pictures show:
//! - every state as `title` over `name`, followed by its details: the outcome
//!   of a terminal state, the roles and quorum of a countersign state, the wait
//!   rule of a children-await state, the deadline (`⏱ 5 working days →
//!   escalate`) and its reminders;
//! - the start state with an entry arrow from a small filled start point;
//! - terminal states with a double border, countersign states as a
//!   "subroutine" box (double side bars), children-await states with a dashed
//!   border, undefined targets in red dashes;
//! - transitions labelled `event [roles]`, the transition title, `[guard] …`
//!   (guard text shortened to 40 characters) and `⇉ spawn …`; deadline expiry
//!   transitions dashed; implicit edges (`sign (all)`, `reject`,
//!   `children settled (all)`) dotted.

mod dot;
mod mermaid;
mod svg;

use std::collections::BTreeMap;

use crate::lang::model::{Quorum, RejectRule, State, WaitFor, Workflow};

/// Output format of [`render`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Graphviz DOT source.
    Dot,
    /// Mermaid `stateDiagram-v2` source.
    Mermaid,
    /// A standalone SVG image, laid out in pure Rust.
    Svg,
}

impl Format {
    /// The usual file extension for the format, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Dot => "dot",
            Format::Mermaid => "mmd",
            Format::Svg => "svg",
        }
    }
}

/// Draws `workflow` in `format`. Never panics, whatever the workflow holds
/// (no states, unknown targets, odd characters).
pub fn render(workflow: &Workflow, format: Format) -> String {
    let diagram = Diagram::from_workflow(workflow);
    match format {
        Format::Dot => dot::render(&diagram),
        Format::Mermaid => mermaid::render(&diagram),
        Format::Svg => svg::render(&diagram),
    }
}

/// Longest guard / spawn text shown on an edge, in characters.
const SHORT_TEXT: usize = 40;

/// What kind of box a node is drawn as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NodeKind {
    Normal,
    /// The case ends here (`outcome` is set).
    Terminal,
    /// A countersign (会签) state.
    Countersign,
    /// Waits for the child cases spawned on entry.
    Awaiting,
    /// A target named by a transition that is not a state of the workflow.
    Dangling,
}

impl NodeKind {
    /// Class name used by the Mermaid and SVG output.
    pub(crate) fn class(self) -> &'static str {
        match self {
            NodeKind::Normal => "normal",
            NodeKind::Terminal => "terminal",
            NodeKind::Countersign => "countersign",
            NodeKind::Awaiting => "awaiting",
            NodeKind::Dangling => "dangling",
        }
    }
}

/// A box of the picture.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    /// The state name (the id in every format).
    pub name: String,
    /// Human title; empty for dangling nodes.
    pub title: String,
    pub kind: NodeKind,
    /// Lines shown under title and name, already on one line each.
    pub details: Vec<String>,
}

impl Node {
    /// Every line of the node's label: title, name, details.
    pub(crate) fn lines(&self) -> Vec<String> {
        let mut lines = Vec::with_capacity(self.details.len() + 2);
        if !self.title.is_empty() && self.title != self.name {
            lines.push(self.title.clone());
        }
        lines.push(one_line(&self.name));
        lines.extend(self.details.iter().cloned());
        lines
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EdgeStyle {
    /// An ordinary transition.
    Solid,
    /// The transition a deadline fires on expiry.
    Dashed,
    /// Implicit: countersign outcome or children settled.
    Dotted,
}

/// An arrow of the picture.
#[derive(Debug, Clone)]
pub(crate) struct Edge {
    /// Index into [`Diagram::nodes`].
    pub from: usize,
    pub to: usize,
    /// Label lines, already on one line each.
    pub lines: Vec<String>,
    pub style: EdgeStyle,
}

/// The format-independent reading of a workflow.
#[derive(Debug, Clone)]
pub(crate) struct Diagram {
    pub name: String,
    pub title: String,
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
    /// The node the start point points at.
    pub start: Option<usize>,
}

impl Diagram {
    pub(crate) fn from_workflow(wf: &Workflow) -> Diagram {
        let mut nodes: Vec<Node> = Vec::new();
        let mut index: BTreeMap<String, usize> = BTreeMap::new();
        for state in &wf.states {
            if index.contains_key(&state.name) {
                // A duplicate name (rejected by validation): its transitions
                // still show, from the first state of that name.
                continue;
            }
            index.insert(state.name.clone(), nodes.len());
            nodes.push(state_node(state));
        }

        // Targets that name no state become dangling nodes, in order of
        // first mention.
        fn node_for(
            name: &str,
            nodes: &mut Vec<Node>,
            index: &mut BTreeMap<String, usize>,
        ) -> usize {
            if let Some(&i) = index.get(name) {
                return i;
            }
            let i = nodes.len();
            index.insert(name.to_string(), i);
            nodes.push(Node {
                name: name.to_string(),
                title: String::new(),
                kind: NodeKind::Dangling,
                details: vec!["(undefined state)".to_string()],
            });
            i
        }

        let start = if wf.start.is_empty() && wf.states.is_empty() {
            None
        } else {
            Some(node_for(&wf.start, &mut nodes, &mut index))
        };

        let mut edges = Vec::new();
        for state in &wf.states {
            let from = node_for(&state.name, &mut nodes, &mut index);
            let expiry = state.deadline.as_ref().and_then(|d| d.on_expiry.as_deref());
            for t in &state.transitions {
                let to = node_for(&t.to, &mut nodes, &mut index);
                let is_expiry = expiry == Some(t.event.as_str());
                let mut first = if is_expiry {
                    format!("⏱ {}", one_line(&t.event))
                } else {
                    one_line(&t.event)
                };
                if !t.roles.is_empty() {
                    first.push_str(&format!(" [{}]", one_line(&t.roles.join(", "))));
                }
                let mut lines = vec![first];
                if !t.title.trim().is_empty() {
                    lines.push(one_line(&t.title));
                }
                if let Some(guard) = &t.guard {
                    lines.push(shorten(
                        &format!("[guard] {}", one_line(guard)),
                        SHORT_TEXT + 8,
                    ));
                }
                if let Some(spawn) = &t.spawn {
                    let what = format!(
                        "{} × {}",
                        one_line(&spawn.workflow),
                        one_line(&spawn.for_each)
                    );
                    lines.push(format!("⇉ spawn {}", shorten(&what, SHORT_TEXT)));
                }
                edges.push(Edge {
                    from,
                    to,
                    lines,
                    style: if is_expiry {
                        EdgeStyle::Dashed
                    } else {
                        EdgeStyle::Solid
                    },
                });
            }
            if let Some(cs) = &state.countersign {
                let approved = node_for(&cs.approved, &mut nodes, &mut index);
                edges.push(Edge {
                    from,
                    to: approved,
                    lines: vec![format!(
                        "{} ({})",
                        one_line(&cs.sign_event),
                        quorum_text(cs.quorum, cs.roles.len())
                    )],
                    style: EdgeStyle::Dotted,
                });
                let rejected = node_for(&cs.rejected, &mut nodes, &mut index);
                let reject = match cs.on_reject {
                    RejectRule::Veto => one_line(&cs.reject_event),
                    RejectRule::CountAgainst => {
                        format!("{} (count against)", one_line(&cs.reject_event))
                    }
                };
                edges.push(Edge {
                    from,
                    to: rejected,
                    lines: vec![reject],
                    style: EdgeStyle::Dotted,
                });
            }
            if let Some(ch) = &state.children {
                let to = node_for(&ch.to, &mut nodes, &mut index);
                edges.push(Edge {
                    from,
                    to,
                    lines: vec![format!("children settled ({})", wait_text(ch.wait))],
                    style: EdgeStyle::Dotted,
                });
            }
        }

        Diagram {
            name: one_line(&wf.name),
            title: one_line(&wf.title),
            nodes,
            edges,
            start,
        }
    }
}

fn quorum_text(q: Quorum, roles: usize) -> String {
    match q {
        Quorum::All => "all".to_string(),
        Quorum::AtLeast(n) => format!("≥{n} of {roles}"),
    }
}

fn wait_text(w: WaitFor) -> &'static str {
    match w {
        WaitFor::All => "all",
        WaitFor::Any => "any",
    }
}

fn state_node(state: &State) -> Node {
    let kind = if state.is_terminal() {
        NodeKind::Terminal
    } else if state.countersign.is_some() {
        NodeKind::Countersign
    } else if state.children.is_some() {
        NodeKind::Awaiting
    } else {
        NodeKind::Normal
    };
    let mut details = Vec::new();
    if let Some(outcome) = &state.outcome {
        details.push(format!("◉ outcome: {}", one_line(outcome)));
    }
    if let Some(cs) = &state.countersign {
        details.push(format!(
            "会签 countersign: {}",
            one_line(&cs.roles.join(", "))
        ));
        let rule = match cs.on_reject {
            RejectRule::Veto => "veto",
            RejectRule::CountAgainst => "rejections count against",
        };
        details.push(format!(
            "quorum: {} ({rule})",
            quorum_text(cs.quorum, cs.roles.len())
        ));
    }
    if let Some(ch) = &state.children {
        let wait = match ch.wait {
            WaitFor::All => "All",
            WaitFor::Any => "Any",
        };
        details.push(format!("⇇ wait {wait} children → {}", one_line(&ch.to)));
    }
    if let Some(d) = &state.deadline {
        let mut line = format!("⏱ {}", one_line(&d.within.to_string()));
        if let Some(ev) = &d.on_expiry {
            line.push_str(&format!(" → {}", one_line(ev)));
        }
        details.push(line);
        if !d.reminders.is_empty() {
            let list: Vec<String> = d
                .reminders
                .iter()
                .map(|p| one_line(&p.to_string()))
                .collect();
            details.push(format!("↳ remind {} before", list.join(", ")));
        }
    }
    Node {
        name: state.name.clone(),
        title: one_line(&state.title),
        kind,
        details,
    }
}

/// Collapses every run of whitespace (newlines included) into one space.
pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Cuts `s` to at most `max` characters, ending in `…` when cut.
pub(crate) fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Width of `c` in Latin-character units: CJK, full-width and symbol
/// characters count 2.
pub(crate) fn char_width(c: char) -> usize {
    match c as u32 {
        0x1100..=0x115F // Hangul Jamo
        | 0x2190..=0x21FF // arrows
        | 0x2300..=0x23FF // misc technical (⏱ ⏰)
        | 0x25A0..=0x27BF // shapes, symbols, dingbats
        | 0x2E80..=0xA4CF // CJK radicals … Yi
        | 0xAC00..=0xD7A3 // Hangul syllables
        | 0xF900..=0xFAFF // CJK compatibility ideographs
        | 0xFE30..=0xFE4F // CJK compatibility forms
        | 0xFF00..=0xFF60 // full-width forms
        | 0xFFE0..=0xFFE6
        | 0x1F000..=0x1FAFF // emoji
        | 0x20000..=0x3FFFD => 2,
        _ => 1,
    }
}

/// Display width of `s` in Latin-character units.
pub(crate) fn display_width(s: &str) -> usize {
    s.chars().map(char_width).sum()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::lang::model::Workflow;

    /// A workflow with every kind of state and edge.
    pub(crate) const SAMPLE: &str = r#"(
    name: "permit_flow",
    title: "许可联办",
    roles: [
        (name: "applicant", title: "申请人"),
        (name: "work_team", title: "工作专班"),
        (name: "county"),
        (name: "city"),
    ],
    start: "submitted",
    states: [
        (
            name: "submitted",
            title: "已提交",
            transitions: [
                (event: "classify", to: "county_handling", title: "分类", roles: ["work_team"]),
                (event: "withdraw", to: "withdrawn", roles: ["applicant"]),
            ],
        ),
        (
            name: "county_handling",
            title: "县级办理",
            deadline: (within: WorkingDays(5), on_expiry: "escalate", reminders: [WorkingDays(2), Hours(4)]),
            transitions: [
                (event: "escalate", to: "joint_review"),
                (
                    event: "fan_out",
                    to: "awaiting_permits",
                    title: "分发许可",
                    roles: ["county"],
                    guard: "vars.a < 3 && vars.b",
                    spawn: (for_each: "vars.permits", workflow: "\"permit_check\""),
                ),
                (event: "note", to: "county_handling", roles: ["county"], guard: "vars.path == 'C:\\tmp' || vars.kind == \"food\" || vars.very_long_condition_name > 100"),
                (event: "report", to: "nowhere", roles: ["county"]),
            ],
        ),
        (
            name: "awaiting_permits",
            title: "等待子流程",
            children: (wait: All, to: "joint_review"),
        ),
        (
            name: "joint_review",
            title: "联合会签",
            countersign: (roles: ["county", "city"], quorum: AtLeast(2), approved: "done", rejected: "refused"),
        ),
        (name: "done", title: "办结", outcome: "approved"),
        (name: "refused", title: "不予许可", outcome: "rejected"),
        (name: "withdrawn", title: "撤回", outcome: "withdrawn"),
    ],
)"#;

    pub(crate) fn sample() -> Workflow {
        ron::Options::default()
            .with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME)
            .from_str::<Workflow>(SAMPLE)
            .expect("sample workflow parses")
    }

    pub(crate) fn empty() -> Workflow {
        Workflow {
            name: String::new(),
            title: String::new(),
            description: String::new(),
            catalogues: vec![],
            roles: vec![],
            variables: vec![],
            start: String::new(),
            states: vec![],
        }
    }

    #[test]
    fn diagram_reads_every_kind() {
        let d = Diagram::from_workflow(&sample());
        let kind = |n: &str| d.nodes.iter().find(|x| x.name == n).map(|x| x.kind);
        assert_eq!(kind("done"), Some(NodeKind::Terminal));
        assert_eq!(kind("joint_review"), Some(NodeKind::Countersign));
        assert_eq!(kind("awaiting_permits"), Some(NodeKind::Awaiting));
        assert_eq!(kind("county_handling"), Some(NodeKind::Normal));
        assert_eq!(kind("nowhere"), Some(NodeKind::Dangling));
        assert_eq!(d.start, Some(0));
        // 6 transitions + 2 countersign + 1 children.
        assert_eq!(d.edges.len(), 9);
        assert_eq!(
            d.edges
                .iter()
                .filter(|e| e.style == EdgeStyle::Dotted)
                .count(),
            3
        );
        assert_eq!(
            d.edges
                .iter()
                .filter(|e| e.style == EdgeStyle::Dashed)
                .count(),
            1
        );
        let county = d
            .nodes
            .iter()
            .find(|x| x.name == "county_handling")
            .unwrap();
        assert!(
            county
                .details
                .contains(&"⏱ 5 working days → escalate".to_string())
        );
        assert!(
            county
                .details
                .contains(&"↳ remind 2 working days, 4 hours before".to_string())
        );
    }

    /// A deadline on a day of the calendar is labelled with that day (Period's Display).
    #[test]
    fn anchored_deadlines_are_labelled_with_their_day() {
        use crate::lang::model::{Period, Span};
        let mut w = sample();
        let deadline = w
            .states
            .iter_mut()
            .find(|s| s.name == "county_handling")
            .and_then(|s| s.deadline.as_mut())
            .unwrap();
        deadline.within = Period::DayOf {
            day: 1,
            of: Span::NextMonth,
            postpone_over_holidays: true,
        };
        let d = Diagram::from_workflow(&w);
        let county = d
            .nodes
            .iter()
            .find(|x| x.name == "county_handling")
            .unwrap();
        let label = "⏱ by day 1 of next month, postponed over holidays → escalate";
        assert!(
            county.details.contains(&label.to_string()),
            "{:?}",
            county.details
        );
    }

    #[test]
    fn guard_is_shortened() {
        let d = Diagram::from_workflow(&sample());
        let note = d
            .edges
            .iter()
            .find(|e| e.lines[0] == "note [county]")
            .unwrap();
        let guard = &note.lines[1];
        assert!(guard.starts_with("[guard] vars.path"));
        assert!(guard.ends_with('…'));
        assert_eq!(guard.chars().count(), SHORT_TEXT + 8);
    }

    #[test]
    fn widths() {
        assert_eq!(display_width("县级办理"), 8);
        assert_eq!(display_width("abc"), 3);
        assert_eq!(display_width("⏱ 5"), 4);
    }

    /// A workflow built from arbitrary bytes: any number of states, edges to
    /// anything (themselves, each other, unknown names), every state kind.
    fn from_bytes(bytes: &[u8]) -> Workflow {
        use crate::lang::model::{
            Amount, AwaitChildren, Countersign, Deadline, Period, Spawn, Transition,
        };
        const NAMES: &[&str] = &["a", "b", "c", "d", "e", "县", "state", "x-y", "ghost"];
        let mut wf = empty();
        let mut it = bytes.iter().copied();
        let mut next = move || it.next().unwrap_or(0);
        let n = (next() % 7) as usize;
        let name = |k: u8| NAMES[k as usize % NAMES.len()].to_string();
        wf.start = name(next());
        for (i, state_name) in NAMES.iter().enumerate().take(n) {
            let mut st = State {
                name: state_name.to_string(),
                title: format!("状态{i}"),
                outcome: None,
                deadline: None,
                countersign: None,
                children: None,
                transitions: vec![],
            };
            let flags = next();
            if flags & 1 != 0 {
                st.outcome = Some("done".into());
            }
            if flags & 2 != 0 {
                st.deadline = Some(Deadline {
                    within: Period::WorkingDays(Amount::Fixed(3)),
                    on_expiry: Some("e0".into()),
                    reminders: vec![Period::Hours(Amount::Variable("h".into()))],
                });
            }
            if flags & 4 != 0 {
                st.countersign = Some(Countersign {
                    roles: vec!["r".into()],
                    quorum: Quorum::All,
                    sign_event: "sign".into(),
                    reject_event: "reject".into(),
                    approved: name(next()),
                    rejected: name(next()),
                    on_reject: RejectRule::Veto,
                });
            }
            if flags & 8 != 0 {
                st.children = Some(AwaitChildren {
                    wait: WaitFor::Any,
                    to: name(next()),
                });
            }
            for k in 0..(flags >> 4) % 4 {
                st.transitions.push(Transition {
                    event: format!("e{k}"),
                    to: name(next()),
                    title: String::new(),
                    roles: vec!["r".into()],
                    guard: (k == 1).then(|| "a < b && c > \"d\"".to_string()),
                    payload: vec![],
                    effects: vec![],
                    spawn: (k == 2).then(|| Spawn {
                        for_each: "vars.l".into(),
                        workflow: "'w'".into(),
                        variables: Default::default(),
                        bindings: Default::default(),
                    }),
                    keep_deadline: false,
                });
            }
            wf.states.push(st);
        }
        wf
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..48)) {
            let wf = from_bytes(&bytes);
            for f in [Format::Dot, Format::Mermaid, Format::Svg] {
                let out = render(&wf, f);
                proptest::prop_assert_eq!(&out, &render(&wf, f));
                if f == Format::Svg {
                    proptest::prop_assert!(out.starts_with("<?xml"));
                    proptest::prop_assert_eq!(out.matches("</svg>").count(), 1);
                }
            }
        }
    }

    #[test]
    fn every_format_survives_odd_input() {
        let mut odd = sample();
        odd.start = "missing".into();
        odd.states[0].name = "a \"b\" \\ c: d; e # f % g-h {i}".into();
        odd.states[1].title = "line1\nline2 <&>".into();
        odd.states.push(odd.states[2].clone()); // duplicate name
        for wf in [empty(), odd, sample()] {
            for f in [Format::Dot, Format::Mermaid, Format::Svg] {
                let a = render(&wf, f);
                assert!(!a.is_empty());
                assert_eq!(a, render(&wf, f), "{f:?} is deterministic");
            }
        }
    }
}

//! Small workflows, written inline, for the engine's and the scenario runner's tests.

use std::path::PathBuf;

use chrono::{DateTime, Utc};

use crate::calendar::Calendar;
use crate::lang::load::{Sources, from_texts};
use crate::lang::validate::{Library, validate};

pub const AGENCIES: &str = r#"Agencies(agencies: [
    Agency(id: "p", name: "省", level: Province),
    Agency(id: "c", name: "市", level: City, parent: "p"),
    Agency(id: "k", name: "县", level: County, parent: "c"),
    Agency(id: "k2", name: "县二", level: County, parent: "c"),
    Agency(id: "ent", name: "企业服务平台", level: County, parent: "k"),
    Agency(id: "amr", name: "市场监管局", level: City, parent: "c"),
    Agency(id: "tax", name: "税务局", level: City, parent: "c"),
])"#;

pub const PERMITS: &str = r#"Catalogue(
    name: "permits",
    title: "许可事项",
    columns: [
        Column(name: "id", type: String),
        Column(name: "name", type: String),
        Column(name: "category", type: Enum(["filing", "approval"])),
        Column(name: "department", type: Agency),
    ],
    rows: [
        ["P1", "食品经营许可", "approval", "amr"],
        ["P2", "涉税备案", "filing", "tax"],
    ],
)"#;

pub const PERMIT: &str = r#"Workflow(
    name: "permit",
    title: "许可申请",
    catalogues: ["permits"],
    roles: [
        Role(name: "overseer", binding: Expr("roles.city")),
        Role(name: "applicant", binding: Starter),
        Role(name: "county", binding: Variable("county")),
        Role(name: "city", binding: ParentOf("county")),
        Role(name: "province", binding: AncestorOf(role: "county", level: Province)),
        Role(name: "amr", binding: Fixed("amr")),
        Role(name: "tax", title: "税务"),
    ],
    variables: [
        Variable(name: "county", given: true, type: Agency),
        Variable(name: "amount", given: true, type: Integer, default: 0),
        Variable(name: "level", given: true, type: Enum(["county", "city", "province"]), default: "county"),
        Variable(name: "permits", given: true, type: List(String), default: []),
        Variable(name: "days", given: true, type: Integer, default: 2),
        Variable(name: "fee", given: true, type: Decimal, default: "0"),
        Variable(name: "note", given: true, type: String),
    ],
    start: "draft",
    states: [
        State(name: "draft", title: "待提交", transitions: [
            Transition(event: "submit", to: "review", roles: ["applicant"],
                payload: [
                    Field(name: "amount", type: Integer),
                    Field(name: "note", type: String, required: false),
                    Field(name: "fee", type: Decimal, required: false),
                ],
                effects: [
                    Set(var: "amount", value: "payload.amount"),
                    Set(var: "note", value: "has(payload.note) ? payload.note : null"),
                    Set(var: "fee", value: "has(payload.fee) ? payload.fee : 0.0"),
                ]),
            Transition(event: "withdraw", to: "withdrawn", roles: ["applicant"]),
        ]),
        State(name: "review", title: "审核",
            deadline: Deadline(within: Hours(48), on_expiry: "escalate", reminders: [Hours(24), Hours(60)]),
            transitions: [
                Transition(event: "approve", to: "approved", roles: ["county", "city"], guard: "vars.amount < 100"),
                Transition(event: "approve", to: "joint", roles: ["county", "city"],
                    guard: "vars.amount >= 100 && vars.level != 'county'"),
                Transition(event: "escalate", to: "review", effects: [
                    Set(var: "level", value: "'city'"),
                    Bind(role: "county", to: ParentOf("county")),
                ]),
                Transition(event: "route", to: "waiting", roles: ["county"],
                    spawn: Spawn(
                        for_each: "vars.permits",
                        workflow: "catalogues.permits[item].category == 'filing' ? 'filing' : 'child'",
                        variables: {"permit": "item"},
                        bindings: {"dept": Expr("catalogues.permits[item].department")},
                    )),
                Transition(event: "withdraw", to: "withdrawn", roles: ["applicant"],
                    guard: "agencies[actor.agency].level == 'county' && 'applicant' in actor.roles && now > timestamp('2020-01-01T00:00:00Z')"),
            ]),
        State(name: "joint", title: "会签",
            countersign: Countersign(roles: ["amr", "tax"], approved: "approved", rejected: "refused"),
            deadline: Deadline(within: WorkingDays("days"), on_expiry: "timeout", reminders: [WorkingDays(1)]),
            transitions: [Transition(event: "timeout", to: "refused")]),
        State(name: "waiting", title: "等待子件", children: AwaitChildren(wait: All, to: "approved"),
            transitions: [Transition(event: "withdraw", to: "withdrawn", roles: ["applicant"])]),
        State(name: "approved", title: "已批准", outcome: "approved"),
        State(name: "refused", title: "不予批准", outcome: "refused"),
        State(name: "withdrawn", title: "已撤回", outcome: "withdrawn"),
    ],
)"#;

pub const CHILD: &str = r#"Workflow(
    name: "child",
    title: "子件审批",
    roles: [Role(name: "dept"), Role(name: "applicant", binding: Starter)],
    variables: [Variable(name: "permit", given: true, type: String)],
    start: "check",
    states: [
        State(name: "check", title: "审查", transitions: [
            Transition(event: "issue", to: "issued", roles: ["dept"]),
            Transition(event: "deny", to: "denied", roles: ["dept"]),
            Transition(event: "parent-settled", to: "cancelled", roles: [],
                guard: "payload.outcome == 'withdrawn'"),
        ]),
        State(name: "issued", title: "发证", outcome: "issued"),
        State(name: "denied", title: "不予发证", outcome: "denied"),
        State(name: "cancelled", title: "随申请撤回", outcome: "cancelled"),
    ],
)"#;

pub const FILING: &str = r#"Workflow(
    name: "filing",
    title: "备案",
    roles: [Role(name: "dept")],
    variables: [Variable(name: "permit", given: true, type: String)],
    start: "filed",
    states: [State(name: "filed", title: "已备案", outcome: "filed")],
)"#;

pub const VOTE: &str = r#"Workflow(
    name: "vote",
    title: "会审",
    roles: [Role(name: "a"), Role(name: "b"), Role(name: "c")],
    variables: [Variable(name: "strict", given: true, type: Boolean, default: true)],
    start: "voting",
    states: [
        State(name: "voting", title: "会审中",
            countersign: Countersign(roles: ["a", "b", "c"], quorum: AtLeast(2), on_reject: CountAgainst,
                sign_event: "agree", reject_event: "disagree", approved: "passed", rejected: "failed"),
            deadline: Deadline(within: Days(1), on_expiry: "lapse"),
            transitions: [Transition(event: "lapse", to: "failed", guard: "vars.strict")]),
        State(name: "passed", title: "通过", outcome: "passed"),
        State(name: "failed", title: "未通过", outcome: "failed"),
    ],
)"#;

pub const RACE: &str = r#"Workflow(
    name: "race",
    title: "择一",
    roles: [Role(name: "boss")],
    variables: [Variable(name: "items", given: true, type: List(String), default: ["P1", "P1"])],
    start: "open",
    states: [
        State(name: "open", title: "开始", transitions: [
            Transition(event: "go", to: "wait", roles: ["boss"],
                spawn: Spawn(for_each: "vars.items", workflow: "'child'",
                    variables: {"permit": "item"}, bindings: {"dept": Fixed("amr")})),
        ]),
        State(name: "wait", title: "等待", children: AwaitChildren(wait: Any, to: "done")),
        State(name: "done", title: "完成", outcome: "done"),
    ],
)"#;

pub const CALENDAR: &str = "date,kind
2020-01-01,holiday
2020-10-01,holiday
2020-10-02,holiday
2020-10-03,holiday
2020-10-04,holiday
2020-10-05,holiday
2020-10-06,holiday
2020-10-07,holiday
2020-10-08,holiday
2020-09-27,workday
2020-10-10,workday
";

/// Sources from inline texts (named like files), plus the calendar if given.
pub fn sources(docs: &[(&str, &str)], calendar: Option<&str>) -> Sources {
    let calendar = calendar.map(|text| {
        let cal = Calendar::parse("cn_holidays.csv", text).expect("test calendar parses");
        (PathBuf::from("calendar/cn_holidays.csv"), cal)
    });
    let files = docs
        .iter()
        .map(|(name, text)| (PathBuf::from(name), (*text).to_owned()))
        .collect();
    from_texts(files, calendar)
}

pub fn standard_docs() -> Vec<(&'static str, &'static str)> {
    vec![
        ("agencies.ron", AGENCIES),
        ("catalogues/permits.ron", PERMITS),
        ("permit.ron", PERMIT),
        ("child.ron", CHILD),
        ("filing.ron", FILING),
        ("vote.ron", VOTE),
        ("race.ron", RACE),
    ]
}

pub fn library_of(sources: &Sources) -> Library {
    let validated = validate(sources);
    let errors: Vec<String> = validated
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(|d| d.to_string())
        .collect();
    validated
        .library
        .unwrap_or_else(|| panic!("test sources do not validate:\n{}", errors.join("\n")))
}

/// The standard test library, with the calendar.
pub fn library() -> Library {
    library_of(&sources(&standard_docs(), Some(CALENDAR)))
}

/// The standard test library without a calendar.
pub fn library_without_calendar() -> Library {
    library_of(&sources(&standard_docs(), None))
}

pub fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .expect("test time parses")
        .to_utc()
}

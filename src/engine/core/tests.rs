use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use proptest::prelude::*;
use serde_json::{Value as Json, json};

use super::*;
use crate::engine::testkit::{self, at};
use crate::lang::validate::Library;

fn t0() -> DateTime<Utc> {
    // Monday 2020-09-21, 09:00 in Shanghai.
    at("2020-09-21T09:00:00+08:00")
}

fn obj(v: Json) -> JsonMap<String, Json> {
    v.as_object().cloned().unwrap_or_default()
}

fn given(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn start_permit(lib: &Library, vars: Json) -> Step {
    start(
        lib,
        "permit",
        "c1",
        "ent",
        &given(&[("tax", "tax")]),
        &obj(vars),
        t0(),
    )
    .expect("starts")
}

// The three kinds of input, and applying the first two.

fn fire_input(event: &str, agency: &str, payload: Json) -> Input {
    Input::Fire {
        event: event.into(),
        agency: agency.into(),
        payload: obj(payload),
    }
}

fn timer(id: &str) -> Input {
    Input::Timer {
        timer_id: id.into(),
    }
}

fn settled(child: &str, outcome: &str) -> Input {
    Input::ChildSettled {
        child_id: child.into(),
        outcome: outcome.into(),
    }
}

fn fire(
    lib: &Library,
    case: &Case,
    event: &str,
    agency: &str,
    payload: Json,
    now: DateTime<Utc>,
) -> Result<Step, Rejection> {
    apply(lib, case, &fire_input(event, agency, payload), now)
}

fn fire_timer(
    lib: &Library,
    case: &Case,
    timer_id: &str,
    now: DateTime<Utc>,
) -> Result<Step, Rejection> {
    apply(lib, case, &timer(timer_id), now)
}

fn ok(r: Result<Step, Rejection>) -> Step {
    r.unwrap_or_else(|e| panic!("rejected: {e}"))
}

fn err(r: Result<Step, Rejection>) -> Rejection {
    match r {
        Ok(s) => panic!("accepted: {} → {}", s.entry.from, s.entry.to),
        Err(e) => e,
    }
}

fn hours(n: i64) -> TimeDelta {
    TimeDelta::hours(n)
}

/// `case` after its applicant submits `payload` at `now`.
fn submit(lib: &Library, case: &Case, payload: Json, now: DateTime<Utc>) -> Case {
    ok(fire(lib, case, "submit", "ent", payload, now)).case
}

/// A permit case submitted with `amount`, now in `review`.
fn in_review(lib: &Library, amount: i64) -> Case {
    let case = start_permit(lib, json!({"county": "k"})).case;
    submit(lib, &case, json!({"amount": amount}), t0() + hours(1))
}

/// A `vote` case `id` started by `p`, its voters `k`, `k2` and `amr`.
fn start_vote(lib: &Library, id: &str, vars: Json) -> Case {
    let voters = given(&[("a", "k"), ("b", "k2"), ("c", "amr")]);
    ok(start(lib, "vote", id, "p", &voters, &obj(vars), t0())).case
}

#[test]
fn reject_codes_have_kebab_names() {
    assert_eq!(RejectCode::GuardFalse.as_str(), "guard-false");
    assert_eq!(RejectCode::RoleNotAllowed.to_string(), "role-not-allowed");
    for code in RejectCode::ALL {
        assert_eq!(RejectCode::parse(code.as_str()), Some(code));
        assert_eq!(
            serde_json::to_value(code).ok(),
            Some(Json::String(code.as_str().into()))
        );
    }
    assert_eq!(RejectCode::parse("nope"), None);
}

#[test]
fn start_binds_roles_in_dependency_order_and_fills_defaults() {
    let lib = testkit::library();
    let step = start_permit(&lib, json!({"county": "k", "fee": "12.50"}));
    let case = &step.case;
    assert_eq!(case.state, "draft");
    assert_eq!(case.seq, 1);
    assert_eq!(case.digest, lib.workflows["permit"].digest);
    let b = |r: &str| case.bindings.get(r).map(String::as_str);
    assert_eq!(b("applicant"), Some("ent"));
    assert_eq!(b("county"), Some("k"));
    assert_eq!(b("city"), Some("c"));
    assert_eq!(b("province"), Some("p"));
    assert_eq!(b("overseer"), Some("c"), "Expr derived from a derived role");
    assert_eq!(b("amr"), Some("amr"));
    assert_eq!(b("tax"), Some("tax"));
    assert_eq!(case.vars["fee"], json!("12.5"), "normalised");
    assert_eq!(case.vars["amount"], json!(0), "default");
    assert_eq!(case.vars["level"], json!("county"));
    assert_eq!(case.vars["note"], Json::Null, "unset");
    let e = &step.entry;
    assert_eq!((e.seq, e.event.as_str()), (1, "start"));
    assert_eq!((e.from.as_str(), e.to.as_str()), ("", "draft"));
    assert_eq!(e.actor, Actor::Agency("ent".into()));
    assert_eq!(e.vars_changed, case.vars);
    assert_eq!(e.bindings_changed, case.bindings);
    assert!(case.timers.is_empty() && step.settled.is_none());
    let args = e.start_args().expect("start entry");
    assert_eq!(args.starter, "ent");
    assert_eq!(args.bindings, given(&[("tax", "tax")]));
    assert_eq!(args.variables["fee"], json!("12.50"));
    assert_eq!(e.input(), None);
}

#[test]
fn a_start_sets_only_given_variables_and_only_for_a_starter_with_a_role() {
    let permit = testkit::PERMIT.replace(
        r#"Variable(name: "amount", given: true,"#,
        r#"Variable(name: "amount","#,
    );
    assert_ne!(permit, testkit::PERMIT);
    let docs: Vec<(&str, &str)> = testkit::standard_docs()
        .into_iter()
        .map(|(name, text)| (name, if name == "permit.ron" { &permit } else { text }))
        .collect();
    let lib = testkit::library_of(&testkit::sources(&docs, None));
    let bindings = given(&[("tax", "tax")]);
    let admitted = |vars: Json, starter: &str| {
        let vars = obj(vars);
        let step = start(&lib, "permit", "c1", starter, &bindings, &vars, t0())?;
        admit_start(&lib, &step, starter, &vars)
    };
    assert_eq!(admitted(json!({"county": "k", "note": "n"}), "tax"), Ok(()));
    // `amount` is the workflow's own record: a start cannot forge it.
    let e = admitted(json!({"county": "k", "amount": 3}), "tax").unwrap_err();
    assert_eq!(e.code, RejectCode::InvalidStart);
    assert!(
        e.message.contains("`amount` is kept by workflow `permit`")
            && e.message.contains("given: true")
            && e.message.contains("county"),
        "{e}"
    );
    // The core's own start still takes it: replays of histories recorded
    // before the rule must go on reproducing them.
    assert!(
        start(
            &lib,
            "permit",
            "c1",
            "tax",
            &bindings,
            &obj(json!({"county": "k", "amount": 3})),
            t0()
        )
        .is_ok()
    );
    let voters = given(&[("a", "k"), ("b", "k2"), ("c", "amr")]);
    let none = JsonMap::new();
    let vote = start(&lib, "vote", "v1", "p", &voters, &none, t0()).unwrap();
    let e = admit_start(&lib, &vote, "p", &none).unwrap_err();
    assert_eq!(e.code, RejectCode::RoleNotAllowed);
    assert!(e.message.contains("`p` would hold no role"), "{e}");
    assert_eq!(admit_start(&lib, &vote, "k", &none), Ok(()));
}

#[test]
fn roles_kept_separate_are_never_held_by_one_agency() {
    const SEPARATE: &str = r#"Workflow(
        name: "separate",
        title: "职责分离",
        roles: [
            Role(name: "applicant", binding: Starter, separate_from: ["approval"]),
            Role(name: "approval", binding: Given),
            Role(name: "deputy", binding: Given),
        ],
        start: "review",
        states: [
            State(name: "review", title: "审查", transitions: [
                Transition(event: "delegate", to: "review", roles: ["approval"],
                    effects: [Bind(role: "approval", to: Expr("roles.deputy"))]),
                Transition(event: "grant", to: "granted", roles: ["approval"]),
            ]),
            State(name: "granted", title: "准予", outcome: "granted"),
        ],
    )"#;
    let mut docs = testkit::standard_docs();
    docs.push(("separate.ron", SEPARATE));
    let lib = testkit::library_of(&testkit::sources(&docs, None));
    let none = JsonMap::new();
    let go = |starter: &str, approval: &str, deputy: &str| {
        let roles = given(&[("approval", approval), ("deputy", deputy)]);
        start(&lib, "separate", "s1", starter, &roles, &none, t0())
    };
    // The applicant cannot name itself its own approver.
    let e = err(go("ent", "ent", "amr"));
    assert_eq!(e.code, RejectCode::InvalidStart);
    assert!(
        e.message
            .contains("`ent` would hold both role `applicant` and role `approval`"),
        "{e}"
    );
    // Nor pass the approval to itself later.
    let case = ok(go("ent", "amr", "ent")).case;
    let e = err(fire(&lib, &case, "delegate", "amr", json!({}), t0()));
    assert_eq!(e.code, RejectCode::EffectFailed);
    assert!(e.message.contains("re-binding role `approval`"), "{e}");
    let case = ok(go("ent", "amr", "tax")).case;
    let delegated = ok(fire(&lib, &case, "delegate", "amr", json!({}), t0())).case;
    assert_eq!(delegated.bindings["approval"], "tax");
}

/// Regression: an agency could name itself, or any agency, the county of a
/// case (`county = hebei.sjz.tax`), and hold the county's role. A role with
/// a `level` is held only by an agency at that level, at start and after a
/// re-binding.
#[test]
fn a_role_with_a_level_is_held_only_at_that_level() {
    const LEVELLED: &str = r#"Workflow(
        name: "levelled",
        title: "层级",
        roles: [
            Role(name: "applicant", binding: Starter),
            Role(name: "county_gov", binding: Variable("county"), level: County),
            Role(name: "city_gov", binding: ParentOf("county_gov"), level: City),
        ],
        variables: [Variable(name: "county", given: true, type: Agency)],
        start: "review",
        states: [
            State(name: "review", title: "审查", transitions: [
                Transition(event: "hand_over", to: "review", roles: ["county_gov"],
                    payload: [Field(name: "to", type: Agency)],
                    effects: [Bind(role: "county_gov", to: Expr("payload.to"))]),
                Transition(event: "grant", to: "granted", roles: ["county_gov"]),
            ]),
            State(name: "granted", title: "准予", outcome: "granted"),
        ],
    )"#;
    let mut docs = testkit::standard_docs();
    docs.push(("levelled.ron", LEVELLED));
    let lib = testkit::library_of(&testkit::sources(&docs, None));
    let none = BTreeMap::new();
    let go = |county: &str| {
        start(
            &lib,
            "levelled",
            "l1",
            "ent",
            &none,
            &obj(json!({"county": county})),
            t0(),
        )
    };
    let e = err(go("amr"));
    assert_eq!(e.code, RejectCode::InvalidStart);
    assert!(
        e.message.contains(
            "`amr` is a city-level agency and role `county_gov` of workflow `levelled` is held only at the county level"
        ),
        "{e}"
    );
    let case = ok(go("k")).case;
    assert_eq!(case.bindings["city_gov"], "c");
    let e = err(fire(
        &lib,
        &case,
        "hand_over",
        "k",
        json!({"to": "amr"}),
        t0(),
    ));
    assert_eq!(e.code, RejectCode::EffectFailed);
    assert!(e.message.contains("re-binding role `county_gov`"), "{e}");
    let moved = ok(fire(
        &lib,
        &case,
        "hand_over",
        "k",
        json!({"to": "k2"}),
        t0(),
    ))
    .case;
    assert_eq!(moved.bindings["county_gov"], "k2");
}

/// Regression: the enterprise service platform could name itself to a
/// department's role bound at start (the issuer of a 通报批评, the reviewer
/// of its own permit) wherever the workflow did not keep it apart by name.
/// An agency `for_enterprises` holds only the roles fixed to it.
#[test]
fn an_agency_acting_for_enterprises_holds_no_departments_role() {
    const AGENCIES: &str = r#"Agencies(agencies: [
        Agency(id: "c", name: "市", level: City),
        Agency(id: "pf", name: "企业服务平台", level: City, parent: "c", for_enterprises: true),
        Agency(id: "amr", name: "市场监管局", level: City, parent: "c"),
    ])"#;
    const REVIEW: &str = r#"Workflow(
        name: "review",
        title: "审查",
        roles: [
            Role(name: "platform", binding: Fixed("pf")),
            Role(name: "reviewer", binding: Given),
        ],
        start: "open",
        states: [
            State(name: "open", title: "审查", transitions: [
                Transition(event: "hand_over", to: "open", roles: ["reviewer"],
                    payload: [Field(name: "to", type: Agency)],
                    effects: [Bind(role: "reviewer", to: Expr("payload.to"))]),
                Transition(event: "done", to: "closed", roles: ["reviewer"]),
            ]),
            State(name: "closed", title: "完成", outcome: "done"),
        ],
    )"#;
    let lib = testkit::library_of(&testkit::sources(
        &[("agencies.ron", AGENCIES), ("review.ron", REVIEW)],
        None,
    ));
    let none = JsonMap::new();
    let go = |starter: &str, reviewer: &str| {
        start(
            &lib,
            "review",
            "r1",
            starter,
            &given(&[("reviewer", reviewer)]),
            &none,
            t0(),
        )
    };
    let e = err(go("pf", "pf"));
    assert_eq!(e.code, RejectCode::InvalidStart);
    assert!(
        e.message
            .contains("`pf` acts for enterprises and cannot hold role `reviewer`"),
        "{e}"
    );
    let case = ok(go("amr", "amr")).case;
    assert_eq!(case.bindings["platform"], "pf", "its own role it holds");
    let e = err(fire(
        &lib,
        &case,
        "hand_over",
        "amr",
        json!({"to": "pf"}),
        t0(),
    ));
    assert_eq!(e.code, RejectCode::EffectFailed);
    assert!(e.message.contains("acts for enterprises"), "{e}");
}

/// Regression: a case on a version the library cannot run (it no longer
/// validates, or a newer govflow deployed it) ran under the current rules,
/// and its history then failed to replay.
#[test]
fn a_case_runs_only_on_the_version_it_is_pinned_to() {
    let lib = testkit::library();
    let case = start_permit(&lib, json!({"county": "k"})).case;
    let mut elsewhere = case.clone();
    elsewhere.digest = "0".repeat(64);
    let e = err(fire(
        &lib,
        &elsewhere,
        "submit",
        "ent",
        json!({"amount": 1}),
        t0(),
    ));
    assert_eq!(e.code, RejectCode::VersionUnavailable);
    assert!(e.message.contains("cannot run"), "{e}");
    let e = err(fire_timer(&lib, &elsewhere, "any", t0()));
    assert_eq!(e.code, RejectCode::VersionUnavailable);
    // A case that names no version runs on the current one.
    let mut unnamed = case;
    unnamed.digest.clear();
    assert!(fire(&lib, &unnamed, "submit", "ent", json!({"amount": 1}), t0()).is_ok());
}

#[test]
fn start_rejects_bad_variables_and_bindings() {
    let lib = testkit::library();
    let go = |g: &[(&str, &str)], vars: Json, starter: &str| {
        err(start(
            &lib,
            "permit",
            "c1",
            starter,
            &given(g),
            &obj(vars),
            t0(),
        ))
    };
    let tax = [("tax", "tax")];
    let e = go(&tax, json!({"county": "k", "amout": 3}), "ent");
    assert_eq!(e.code, RejectCode::InvalidStart);
    assert!(
        e.message.contains("`amout`") && e.message.contains("amount"),
        "{e}"
    );
    let e = go(&tax, json!({"county": "k", "amount": "many"}), "ent");
    assert!(
        e.message.contains("variable `amount`: expected an integer"),
        "{e}"
    );
    let e = go(&tax, json!({"county": "nowhere"}), "ent");
    assert!(e.message.contains("nowhere"), "{e}");
    let e = go(&[], json!({"county": "k"}), "ent");
    assert!(e.message.contains("role `tax` (税务) must be given"), "{e}");
    let e = go(
        &[("tax", "tax"), ("amr", "c")],
        json!({"county": "k"}),
        "ent",
    );
    assert!(e.message.contains("cannot be given"), "{e}");
    let e = go(&[("tax", "mars")], json!({"county": "k"}), "ent");
    assert!(e.message.contains("`mars`"), "{e}");
    let e = go(&tax, json!({}), "ent");
    assert!(
        e.message.contains("variable `county`, which is unset"),
        "{e}"
    );
    let e = go(&tax, json!({"county": "k"}), "martian");
    assert!(e.message.contains("starter"), "{e}");
    let e = go(&tax, json!({"county": "k"}), "");
    assert!(e.message.contains("role `applicant`"), "{e}");
    let e = err(start(
        &lib,
        "permitt",
        "c1",
        "ent",
        &given(&tax),
        &obj(json!({})),
        t0(),
    ));
    assert_eq!(e.code, RejectCode::UnknownWorkflow);
    assert!(e.message.contains("did you mean `permit`?"), "{e}");
}

#[test]
fn fire_moves_sets_variables_and_deadline_timers() {
    let lib = testkit::library();
    let case = start_permit(&lib, json!({"county": "k"})).case;
    let now = t0() + hours(1);
    let step = ok(fire(
        &lib,
        &case,
        "submit",
        "ent",
        json!({"amount": "70", "note": "急", "fee": 3}),
        now,
    ));
    let new = &step.case;
    assert_eq!(new.state, "review");
    assert_eq!(new.seq, 2);
    assert_eq!(new.vars["amount"], json!(70));
    assert_eq!(new.vars["note"], json!("急"));
    assert_eq!(new.vars["fee"], json!("3"));
    assert_eq!(new.updated_at, now);
    let e = &step.entry;
    assert_eq!(e.payload, json!({"amount": 70, "note": "急", "fee": "3"}));
    assert_eq!(
        e.vars_changed.keys().collect::<Vec<_>>(),
        ["amount", "fee", "note"]
    );
    // 48 hours, one reminder 24 hours before; the 60-hour reminder is already past.
    let ids: Vec<(&str, TimerKind, DateTime<Utc>)> = new
        .timers
        .iter()
        .map(|t| (t.id.as_str(), t.kind, t.due))
        .collect();
    assert_eq!(
        ids,
        [
            ("2:reminder:0", TimerKind::Reminder, now + hours(24)),
            ("2:expiry", TimerKind::Expiry, now + hours(48)),
        ]
    );
    assert_eq!(e.timers_set, new.timers);
    assert_eq!(
        e.calendar_version.as_deref(),
        lib.calendar.as_ref().map(|c| c.version())
    );
    assert!(
        new.timers
            .iter()
            .all(|t| t.event == "escalate" && t.state == "review")
    );
    assert_eq!(
        e.input(),
        Some(Input::Fire {
            event: "submit".into(),
            agency: "ent".into(),
            payload: obj(json!({"amount": 70, "note": "急", "fee": "3"}))
        })
    );
}

#[test]
fn events_in_the_wrong_state_or_unknown_are_rejected() {
    let lib = testkit::library();
    let case = start_permit(&lib, json!({"county": "k"})).case;
    let e = err(fire(&lib, &case, "approve", "k", json!({}), t0()));
    assert_eq!(e.code, RejectCode::WrongState);
    assert_eq!(
        e.message,
        "`approve` cannot happen in state `draft` (待提交); it can in: review"
    );
    let e = err(fire(&lib, &case, "sign", "amr", json!({}), t0()));
    assert_eq!(e.code, RejectCode::WrongState);
    assert!(e.message.ends_with("it can in: joint"), "{e}");
    let e = err(fire(&lib, &case, "aprove", "k", json!({}), t0()));
    assert_eq!(e.code, RejectCode::UnknownEvent);
    assert!(e.message.contains("did you mean `approve`?"), "{e}");
    assert!(e.message.contains("submit, withdraw"), "{e}");
}

#[test]
fn only_the_roles_of_a_transition_may_fire_it() {
    let lib = testkit::library();
    let case = start_permit(&lib, json!({"county": "k"})).case;
    let e = err(fire(&lib, &case, "submit", "k", json!({"amount": 1}), t0()));
    assert_eq!(e.code, RejectCode::RoleNotAllowed);
    assert!(
        e.message.contains("only applicant (bound to ent) may"),
        "{e}"
    );
    assert!(e.message.contains("`k` holds county"), "{e}");
    let e = err(fire(&lib, &case, "submit", "p", json!({"amount": 1}), t0()));
    assert!(e.message.contains("`p` holds province"), "{e}");
    let review = in_review(&lib, 10);
    let e = err(fire(&lib, &review, "escalate", "k", json!({}), t0()));
    assert_eq!(e.code, RejectCode::RoleNotAllowed);
    assert!(e.message.contains("only by the state's deadline"), "{e}");
}

#[test]
fn payloads_are_checked_against_the_transition_fields() {
    let lib = testkit::library();
    let case = start_permit(&lib, json!({"county": "k"})).case;
    let go = |payload: Json| err(fire(&lib, &case, "submit", "ent", payload, t0()));
    let e = go(json!({}));
    assert_eq!(e.code, RejectCode::InvalidPayload);
    assert!(e.message.contains("missing required field `amount`"), "{e}");
    let e = go(json!({"amount": 1, "colour": "red"}));
    assert!(e.message.contains("unknown field `colour`"), "{e}");
    let e = go(json!({"amount": true}));
    assert!(
        e.message
            .contains("field `amount`: expected an integer, found boolean true"),
        "{e}"
    );
    let e = go(json!({"amount": 1, "fee": "1,5"}));
    assert!(e.message.contains("field `fee`"), "{e}");
    // An optional field may be left out or null.
    submit(&lib, &case, json!({"amount": 1, "note": null}), t0());
}

#[test]
fn the_first_transition_whose_guard_holds_is_taken() {
    let lib = testkit::library();
    let review = in_review(&lib, 50);
    let now = t0() + hours(2);
    let step = ok(fire(&lib, &review, "approve", "k", json!({}), now));
    assert_eq!(step.case.state, "approved");
    assert_eq!(step.case.outcome.as_deref(), Some("approved"));
    assert_eq!(step.settled.as_deref(), Some("approved"));
    assert!(step.case.timers.is_empty());
    assert_eq!(step.entry.timers_cancelled, ["2:reminder:0", "2:expiry"]);
    // The city (bound to `city`) may approve as well.
    let step = ok(fire(&lib, &review, "approve", "c", json!({}), now));
    assert_eq!(step.case.state, "approved");
    // Closed.
    let e = err(fire(&lib, &step.case, "withdraw", "ent", json!({}), t0()));
    assert_eq!(e.code, RejectCode::CaseClosed);
    let e = err(fire_timer(&lib, &step.case, "2:expiry", t0() + hours(100)));
    assert_eq!(e.code, RejectCode::CaseClosed);
}

#[test]
fn guards_see_the_actor_the_directory_and_the_time() {
    let lib = testkit::library();
    let review = in_review(&lib, 1);
    let now = t0() + hours(2);
    let step = ok(fire(&lib, &review, "withdraw", "ent", json!({}), now));
    assert_eq!(step.case.outcome.as_deref(), Some("withdrawn"));
    // `c` (a city) bound as applicant fails the level test.
    let mut city = review.clone();
    city.bindings.insert("applicant".into(), "c".into());
    let e = err(fire(&lib, &city, "withdraw", "c", json!({}), now));
    assert_eq!(e.code, RejectCode::GuardFalse);
    assert!(e.message.contains("agencies[actor.agency].level"), "{e}");
}

#[test]
fn all_guards_false_is_guard_false_quoting_them() {
    let lib = testkit::library();
    let review = in_review(&lib, 150);
    let now = t0() + hours(2);
    let e = err(fire(&lib, &review, "approve", "k", json!({}), now));
    assert_eq!(e.code, RejectCode::GuardFalse);
    assert!(e.message.contains("`vars.amount < 100` is false"), "{e}");
    assert!(
        e.message
            .contains("`vars.amount >= 100 && vars.level != 'county'` is false"),
        "{e}"
    );
}

#[test]
fn timers_remind_expire_and_restart_on_re_entry() {
    let lib = testkit::library();
    let review = in_review(&lib, 150);
    let submitted = t0() + hours(1);
    let after = |h: i64| submitted + hours(h);
    let e = err(fire_timer(&lib, &review, "2:expiry", after(47)));
    assert_eq!(e.code, RejectCode::TimerNotDue);
    let e = err(fire_timer(&lib, &review, "9:expiry", after(99)));
    assert_eq!(e.code, RejectCode::UnknownTimer);

    let reminded = ok(fire_timer(&lib, &review, "2:reminder:0", after(24)));
    assert_eq!(reminded.entry.event, "reminder:escalate");
    assert_eq!(reminded.entry.actor, Actor::Timer("2:reminder:0".into()));
    assert_eq!(reminded.entry.from, reminded.entry.to);
    assert_eq!(reminded.entry.timers_cancelled, ["2:reminder:0"]);
    assert_eq!(reminded.case.timers.len(), 1);
    assert_eq!(reminded.case.seq, 3);

    let expired = ok(fire_timer(&lib, &reminded.case, "2:expiry", after(48)));
    let case = &expired.case;
    assert_eq!(expired.entry.event, "escalate");
    assert_eq!(
        (expired.entry.from.as_str(), case.state.as_str()),
        ("review", "review")
    );
    assert_eq!(case.vars["level"], json!("city"));
    assert_eq!(case.bindings["county"], "c", "re-bound to the parent");
    assert_eq!(expired.entry.bindings_changed, given(&[("county", "c")]));
    assert_eq!(expired.entry.timers_cancelled, ["2:expiry"]);
    let ids: Vec<&str> = case.timers.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["4:reminder:0", "4:expiry"], "restarted");
    assert_eq!(case.timers[1].due, submitted + hours(96));
    assert_eq!(expired.entry.input(), Some(timer("2:expiry")));
    // A cancelled timer never fires.
    let e = err(fire_timer(&lib, case, "2:expiry", after(200)));
    assert_eq!(e.code, RejectCode::UnknownTimer);
    // Now at city level: the amount over 100 goes to the countersign.
    let step = ok(fire(&lib, case, "approve", "c", json!({}), after(50)));
    assert_eq!(step.case.state, "joint");
}

/// A case in the countersign state `joint`, entered at `now`.
fn in_joint(lib: &Library) -> (Case, DateTime<Utc>) {
    let review = in_review(lib, 150);
    let escalated = ok(fire_timer(lib, &review, "2:expiry", t0() + hours(49))).case;
    let now = t0() + hours(50);
    (
        ok(fire(lib, &escalated, "approve", "c", json!({}), now)).case,
        now,
    )
}

#[test]
fn countersign_collects_signatures_until_the_quorum() {
    let lib = testkit::library();
    let (joint, entered) = in_joint(&lib);
    // Entered Wednesday 2020-09-23 11:00 Shanghai: two working days → end of Friday 25th.
    let expiry = joint.timers.iter().find(|t| t.kind == TimerKind::Expiry);
    assert_eq!(expiry.map(|t| t.due), Some(at("2020-09-26T00:00:00+08:00")));
    let reminder = joint.timers.iter().find(|t| t.kind == TimerKind::Reminder);
    assert_eq!(
        reminder.map(|t| t.due),
        Some(at("2020-09-25T00:00:00+08:00"))
    );
    let now = entered + hours(1);
    let signed = ok(fire(
        &lib,
        &joint,
        "sign",
        "amr",
        json!({"comment": "同意"}),
        now,
    ));
    assert_eq!(signed.case.state, "joint");
    assert_eq!(signed.entry.from, signed.entry.to);
    assert!(signed.entry.timers_cancelled.is_empty(), "no restart");
    assert_eq!(signed.case.timers, joint.timers);
    assert_eq!(
        signed.case.signatures.get("amr"),
        Some(&Signature {
            agency: "amr".into(),
            approved: true,
            at: now
        })
    );
    let e = err(fire(&lib, &signed.case, "sign", "amr", json!({}), now));
    assert_eq!(e.code, RejectCode::WrongState);
    assert!(e.message.contains("role `amr` has already signed"), "{e}");
    let e = err(fire(&lib, &signed.case, "sign", "k", json!({}), now));
    assert_eq!(e.code, RejectCode::RoleNotAllowed);
    assert!(
        e.message.contains("amr (bound to amr), tax (bound to tax)"),
        "{e}"
    );
    let e = err(fire(
        &lib,
        &signed.case,
        "sign",
        "tax",
        json!({"x": 1}),
        now,
    ));
    assert_eq!(e.code, RejectCode::InvalidPayload);
    let done = ok(fire(&lib, &signed.case, "sign", "tax", json!({}), now));
    assert_eq!(done.case.state, "approved");
    assert_eq!(done.settled.as_deref(), Some("approved"));
    assert!(done.case.signatures.is_empty(), "cleared on leaving");
    // Veto: one rejection decides.
    let vetoed = ok(fire(&lib, &joint, "reject", "tax", json!({}), now));
    assert_eq!(vetoed.case.state, "refused");
    assert_eq!(vetoed.settled.as_deref(), Some("refused"));
}

#[test]
fn count_against_rejects_once_the_quorum_cannot_be_met() {
    let lib = testkit::library();
    let case = start_vote(&lib, "v1", json!({}));
    let s1 = ok(fire(&lib, &case, "disagree", "k", json!({}), t0()));
    assert_eq!(s1.case.state, "voting");
    let s2 = ok(fire(&lib, &s1.case, "agree", "k2", json!({}), t0()));
    assert_eq!(s2.case.state, "voting");
    let failed = ok(fire(&lib, &s2.case, "disagree", "amr", json!({}), t0()));
    assert_eq!(failed.case.state, "failed");
    let passed = ok(fire(&lib, &s2.case, "agree", "amr", json!({}), t0()));
    assert_eq!(passed.case.state, "passed");
    let quick = ok(fire(&lib, &case, "agree", "k", json!({}), t0()));
    let quick = ok(fire(&lib, &quick.case, "agree", "amr", json!({}), t0()));
    assert_eq!(quick.case.state, "passed", "two of three suffice");
}

#[test]
fn an_expiry_goes_through_guards() {
    let lib = testkit::library();
    let lenient = start_vote(&lib, "v1", json!({"strict": false}));
    // Days(1) from Monday 09:00: the end of Tuesday.
    assert_eq!(lenient.timers[0].due, at("2020-09-23T00:00:00+08:00"));
    let lapse = timer("1:expiry");
    // No transition applies: the deadline is spent and the history says why,
    // so it can never fire again.
    let spent = ok(apply(&lib, &lenient, &lapse, t0() + hours(48)));
    assert_eq!(
        (spent.entry.from.as_str(), spent.entry.to.as_str()),
        ("voting", "voting")
    );
    assert_eq!(spent.entry.timers_cancelled, vec!["1:expiry".to_owned()]);
    let why = spent.entry.payload[SPENT_KEY].as_str().unwrap_or_default();
    assert!(
        why.starts_with("guard-false") && why.contains("`vars.strict` is false"),
        "{why}"
    );
    assert!(spent.case.timers.iter().all(|t| t.id != "1:expiry"));
    assert_eq!(
        err(apply(&lib, &spent.case, &lapse, t0() + hours(49))).code,
        RejectCode::UnknownTimer
    );
    let strict = start_vote(&lib, "v2", json!({}));
    let step = ok(apply(&lib, &strict, &lapse, t0() + hours(48)));
    assert_eq!(step.case.state, "failed");
    assert_eq!(step.entry.actor, Actor::Timer("1:expiry".into()));
}

/// A permit case escalated by its deadline until the escalation is refused:
/// each escalation binds the county's parent, from the city to the province,
/// then from the province, which has none. The history up to the refusal,
/// the case, the refused timer, the refusal and its time.
struct Escalated {
    entries: Vec<Entry>,
    case: Case,
    timer_id: String,
    refusal: Rejection,
    at: DateTime<Utc>,
}

fn escalate_until_refused(lib: &Library) -> Escalated {
    let started = start_permit(lib, json!({"county": "k"}));
    let submitted = ok(fire(
        lib,
        &started.case,
        "submit",
        "ent",
        json!({"amount": 150}),
        t0() + hours(1),
    ));
    let mut entries = vec![started.entry, submitted.entry];
    let mut case = submitted.case;
    let mut at = t0() + hours(1);
    loop {
        at += hours(49);
        assert!(at < t0() + hours(500), "the escalation never failed");
        let timer_id = case
            .timers
            .iter()
            .find(|t| t.id.ends_with(":expiry"))
            .expect("a deadline")
            .id
            .clone();
        match apply(lib, &case, &timer(&timer_id), at) {
            Ok(step) => {
                assert!(
                    step.entry.payload.get(SPENT_KEY).is_none(),
                    "{:?}",
                    step.entry
                );
                entries.push(step.entry);
                case = step.case;
            }
            Err(refusal) => {
                return Escalated {
                    entries,
                    case,
                    timer_id,
                    refusal,
                    at,
                };
            }
        }
    }
}

#[test]
fn a_deadline_whose_step_fails_is_refused_and_stays_due() {
    // A fault to mend is not a decision: the deadline is not spent but
    // refused, and stays on the case to be tried again.
    let lib = testkit::library();
    let escalated = escalate_until_refused(&lib);
    let refused = &escalated.refusal;
    assert_eq!(refused.code, RejectCode::EffectFailed, "{refused}");
    assert_eq!(escalated.case.bindings["county"], "p");
    assert!(
        escalated
            .case
            .timers
            .iter()
            .any(|t| t.id == escalated.timer_id)
    );
}

/// Histories written before 2026-11-27 spent such a deadline anyway; they
/// still replay, as long as the rules refuse the step the same way.
#[test]
fn a_deadline_spent_on_a_refusal_by_an_older_govflow_still_replays() {
    let lib = testkit::library();
    let Escalated {
        entries,
        case,
        timer_id,
        refusal,
        at,
    } = escalate_until_refused(&lib);
    let old = spent_as_before(&lib, &case, &timer_id, &refusal, at).expect("spendable");
    let mut history = entries.clone();
    history.push(old.entry.clone());
    let replay = |history: &[Entry]| {
        crate::engine::replay::replay(&lib, "permit", &case.digest, "c1", None, history)
    };
    assert!(replay(&history).is_ok(), "{:?}", replay(&history));
    // Recorded as spent for another reason than the rules give now: a divergence.
    let mut other = old.entry;
    other.payload[SPENT_KEY] = json!("calendar: some other refusal");
    let mut tampered = entries;
    tampered.push(other);
    assert!(replay(&tampered).is_err());
}

#[test]
fn working_days_without_a_calendar_are_a_calendar_rejection() {
    let lib = testkit::library_without_calendar();
    let review = in_review(&lib, 150);
    assert_eq!(review.timers.len(), 2, "hours need no calendar");
    assert_eq!(review.timers[0].calendar_version, "");
    let escalated = ok(fire_timer(&lib, &review, "2:expiry", t0() + hours(49))).case;
    let now = t0() + hours(50);
    let e = err(fire(&lib, &escalated, "approve", "c", json!({}), now));
    assert_eq!(e.code, RejectCode::Calendar);
    assert!(e.message.contains("deadline of state `joint`"), "{e}");
}

#[test]
fn a_deadline_counted_from_an_unset_variable_is_a_calendar_rejection() {
    let lib = testkit::library();
    let mut broken = in_review(&lib, 150);
    broken.vars.insert("days".into(), Json::Null);
    broken.vars.insert("level".into(), json!("city"));
    let now = t0() + hours(2);
    let e = err(fire(&lib, &broken, "approve", "k", json!({}), now));
    assert_eq!(e.code, RejectCode::Calendar);
    assert!(e.message.contains("`days`, which is unset"), "{e}");
    // Regression: a count large enough to end past 9999 was accepted, and
    // clients could not read the deadline the server then sent them.
    let within =
        crate::lang::model::Period::Days(crate::lang::model::Amount::Variable("days".into()));
    let vars = |days: u32| BTreeMap::from([("days".to_owned(), json!(days))]);
    let e = deadline_due(&lib, now, &within, &vars(4_000_000)).unwrap_err();
    assert!(
        e.contains("would end in the year 12972") && e.contains("by 9999-12-31"),
        "{e}"
    );
    assert!(deadline_due(&lib, now, &within, &vars(365)).is_ok());
}

#[test]
fn spawn_starts_children_and_the_parent_waits_for_all() {
    let lib = testkit::library();
    let case = start_permit(&lib, json!({"county": "k", "permits": ["P1", "P2"]})).case;
    let review = submit(&lib, &case, json!({"amount": 1}), t0());
    let now = t0() + hours(1);
    let routed = ok(fire(&lib, &review, "route", "k", json!({}), now));
    assert_eq!(routed.case.state, "waiting");
    let workflows: Vec<(&str, &str)> = routed
        .spawn
        .iter()
        .map(|s| (s.child_id.as_str(), s.workflow.as_str()))
        .collect();
    assert_eq!(workflows, [("c1/0", "child"), ("c1/1", "filing")]);
    assert_eq!(routed.spawn[0].bindings, given(&[("dept", "amr")]));
    assert_eq!(routed.spawn[1].bindings, given(&[("dept", "tax")]));
    assert_eq!(routed.spawn[0].vars["permit"], json!("P1"));
    assert_eq!(routed.case.children.len(), 2);
    let parent = routed.case;

    let child0 = ok(start_child(&lib, &parent, &routed.spawn[0], "k", t0())).case;
    assert_eq!(child0.parent.as_deref(), Some("c1"));
    assert_eq!(
        child0.bindings["applicant"], "k",
        "started by the parent's actor"
    );
    let filing = ok(start_child(&lib, &parent, &routed.spawn[1], "k", t0()));
    assert_eq!(
        filing.settled.as_deref(),
        Some("filed"),
        "terminal at start"
    );

    let p1 = ok(apply(&lib, &parent, &settled("c1/1", "filed"), t0()));
    assert_eq!(p1.case.state, "waiting");
    assert_eq!(p1.entry.event, "child-settled");
    assert_eq!(p1.entry.actor, Actor::Engine);
    assert_eq!(p1.entry.input(), Some(settled("c1/1", "filed")));
    let e = err(apply(&lib, &p1.case, &settled("c1/1", "filed"), t0()));
    assert_eq!(e.code, RejectCode::WrongState);
    let e = err(apply(&lib, &p1.case, &settled("c1/7", "filed"), t0()));
    assert_eq!(e.code, RejectCode::UnknownChild);

    let issued = ok(fire(&lib, &child0, "issue", "amr", json!({}), t0()));
    assert_eq!(issued.settled.as_deref(), Some("issued"));
    let p2 = ok(apply(&lib, &p1.case, &settled("c1/0", "issued"), t0()));
    assert_eq!(p2.case.state, "approved");
    assert_eq!(p2.settled.as_deref(), Some("approved"));
    assert_eq!(
        p2.case
            .children
            .iter()
            .map(|c| c.outcome.as_deref())
            .collect::<Vec<_>>(),
        [Some("issued"), Some("filed")]
    );
}

#[test]
fn a_wait_with_nothing_to_wait_for_is_passed_through() {
    let lib = testkit::library();
    let review = in_review(&lib, 1);
    let now = t0() + hours(2);
    let routed = ok(fire(&lib, &review, "route", "k", json!({}), now));
    assert!(routed.spawn.is_empty());
    assert_eq!(routed.entry.to, "approved");
    assert_eq!(routed.settled.as_deref(), Some("approved"));
}

#[test]
fn a_spawn_that_cannot_be_computed_refuses_the_step() {
    let lib = testkit::library();
    let case = start_permit(&lib, json!({"county": "k", "permits": ["P9"]})).case;
    let review = submit(&lib, &case, json!({"amount": 1}), t0());
    let e = err(fire(&lib, &review, "route", "k", json!({}), t0()));
    assert_eq!(e.code, RejectCode::EffectFailed);
    assert!(e.message.contains("child c1/0"), "{e}");
}

#[test]
fn any_child_settling_ends_a_wait_for_any() {
    let lib = testkit::library();
    let case = ok(start(
        &lib,
        "race",
        "r",
        "c",
        &given(&[("boss", "c")]),
        &obj(json!({})),
        t0(),
    ))
    .case;
    let go = ok(fire(&lib, &case, "go", "c", json!({}), t0()));
    assert_eq!(go.spawn.len(), 2);
    assert_eq!(go.case.state, "wait");
    let done = ok(apply(&lib, &go.case, &settled("r/1", "denied"), t0()));
    assert_eq!(done.case.state, "done");
    // The other child settling later finds the case closed.
    let e = err(apply(&lib, &done.case, &settled("r/0", "issued"), t0()));
    assert_eq!(e.code, RejectCode::CaseClosed);
}

#[test]
fn steps_round_trip_through_json() {
    let lib = testkit::library();
    let (joint, now) = in_joint(&lib);
    let step = ok(fire(&lib, &joint, "sign", "amr", json!({}), now));
    let text = serde_json::to_string(&step).expect("serialises");
    let back: Step = serde_json::from_str(&text).expect("deserialises");
    assert_eq!(back, step);
}

#[test]
fn replaying_the_history_reproduces_every_step() {
    let lib = testkit::library();
    let first = start_permit(&lib, json!({"county": "k"}));
    let mut history = vec![first.entry.clone()];
    let mut case = first.case.clone();
    let mut now = t0();
    let inputs = [
        fire_input("submit", "ent", json!({"amount": 500})),
        timer("2:reminder:0"),
        timer("2:expiry"),
        fire_input("approve", "c", json!({})),
        fire_input("sign", "tax", json!({"comment": "可"})),
    ];
    for input in &inputs {
        now += hours(30);
        let step = ok(apply(&lib, &case, input, now));
        history.push(step.entry);
        case = step.case;
    }
    // Replay from the entries alone.
    let args = history[0].start_args().expect("start");
    let mut replayed = ok(start(
        &lib,
        "permit",
        "c1",
        &args.starter,
        &args.bindings,
        &args.variables,
        history[0].at,
    ));
    assert_eq!(replayed.entry, history[0]);
    for entry in &history[1..] {
        let input = entry.input().expect("input");
        replayed = ok(apply(&lib, &replayed.case, &input, entry.at));
        assert_eq!(&replayed.entry, entry);
    }
    assert_eq!(replayed.case, case);
}

// ───────────────────────────── properties ─────────────────────────────

const EVENTS: [&str; 10] = [
    "submit", "approve", "withdraw", "route", "sign", "reject", "escalate", "timeout", "nope",
    "issue",
];
const AGENCIES: [&str; 7] = ["ent", "k", "c", "p", "amr", "tax", "zz"];

fn payload_for(choice: u8) -> Json {
    match choice % 6 {
        0 => json!({}),
        1 => json!({"amount": 50}),
        2 => json!({"amount": 500, "note": "x"}),
        3 => json!({"amount": "abc"}),
        4 => json!({"comment": "ok"}),
        _ => json!({"bogus": 1}),
    }
}

/// One abstract input: kind, event/timer choice, agency, payload, minutes later.
type Op = (u8, u8, u8, u8, u16);

fn input_for(case: &Case, op: Op) -> Input {
    let (kind, which, agency, payload, _) = op;
    match kind % 4 {
        0 | 1 => Input::Fire {
            event: EVENTS[which as usize % EVENTS.len()].into(),
            agency: AGENCIES[agency as usize % AGENCIES.len()].into(),
            payload: obj(payload_for(payload)),
        },
        2 => Input::Timer {
            timer_id: case
                .timers
                .get(which as usize % (case.timers.len() + 1))
                .map(|t| t.id.clone())
                .unwrap_or_else(|| format!("{which}:expiry")),
        },
        _ => Input::ChildSettled {
            child_id: case
                .children
                .get(which as usize % (case.children.len() + 1))
                .map(|c| c.id.clone())
                .unwrap_or_else(|| "nobody".into()),
            outcome: "issued".into(),
        },
    }
}

/// Runs the ops; returns every result as JSON.
fn run(lib: &Library, permits: &[&str], ops: &[Op]) -> Vec<String> {
    let first = start_permit(lib, json!({"county": "k", "permits": permits}));
    let mut out = vec![serde_json::to_string(&first).unwrap_or_default()];
    let mut case = first.case;
    let mut now = t0();
    for &op in ops {
        now += TimeDelta::minutes(i64::from(op.4) * 10);
        let input = input_for(&case, op);
        let result = apply(lib, &case, &input, now);
        out.push(serde_json::to_string(&result).unwrap_or_default());
        if let Ok(step) = result {
            case = step.case;
        }
    }
    out
}

fn op() -> impl Strategy<Value = Op> {
    (
        any::<u8>(),
        any::<u8>(),
        any::<u8>(),
        any::<u8>(),
        0u16..600,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn the_core_is_deterministic(ops in prop::collection::vec(op(), 0..25), two in any::<bool>()) {
        let lib = testkit::library();
        let permits: &[&str] = if two { &["P1", "P2"] } else { &[] };
        let a = run(&lib, permits, &ops);
        let b = run(&lib, permits, &ops);
        prop_assert_eq!(a, b);
    }

    #[test]
    fn a_rejected_input_changes_nothing(ops in prop::collection::vec(op(), 1..25)) {
        let lib = testkit::library();
        let mut case = start_permit(&lib, json!({"county": "k", "permits": ["P1"]})).case;
        let mut now = t0();
        for op in ops {
            now += TimeDelta::minutes(i64::from(op.4) * 10);
            let input = input_for(&case, op);
            let before = serde_json::to_string(&case).unwrap_or_default();
            match apply(&lib, &case, &input, now) {
                Ok(step) => {
                    prop_assert_eq!(step.case.seq, case.seq + 1);
                    prop_assert_eq!(step.entry.seq, step.case.seq);
                    case = step.case;
                }
                Err(rejection) => {
                    prop_assert_eq!(serde_json::to_string(&case).unwrap_or_default(), before);
                    // The same input on the same case is rejected the same way.
                    prop_assert_eq!(apply(&lib, &case, &input, now).err(), Some(rejection));
                }
            }
        }
    }
}

/// Regression: an optional payload field left out used to be present as null,
/// so `has(payload.x)` was always true.
#[test]
fn an_optional_field_left_out_is_absent_to_guards_and_effects() {
    let lib = testkit::library();
    let case = start_permit(&lib, json!({"county": "k"})).case;
    let without = submit(&lib, &case, json!({"amount": 1}), t0());
    assert_eq!(without.vars["note"], Json::Null);
    assert_eq!(without.vars["fee"], json!("0"));
    let with = submit(
        &lib,
        &case,
        json!({"amount": 1, "note": "急", "fee": "12.5"}),
        t0(),
    );
    assert_eq!(with.vars["note"], json!("急"));
    assert_eq!(with.vars["fee"], json!("12.5"));
}

/// A monthly report due by the 1st of the next month, postponed over holidays
/// (每月1日前，节假日顺延), then a deadline at the end of the quarter.
const MONTHLY: &str = r#"Workflow(
    name: "monthly",
    title: "月报",
    roles: [Role(name: "dept", binding: Starter)],
    start: "reporting",
    states: [
        State(name: "reporting", title: "待报送",
            deadline: Deadline(within: DayOf(day: 1, of: NextMonth, postpone_over_holidays: true),
                on_expiry: "late", reminders: [WorkingDays(1)]),
            transitions: [
                Transition(event: "report", to: "done", roles: ["dept"]),
                Transition(event: "late", to: "overdue"),
            ]),
        State(name: "overdue", title: "逾期",
            deadline: Deadline(within: LastDayOf(of: ThisQuarter), on_expiry: "close"),
            transitions: [Transition(event: "close", to: "done")]),
        State(name: "done", title: "已报送", outcome: "done"),
    ],
)"#;

fn monthly_library(calendar: Option<&str>) -> Library {
    testkit::library_of(&testkit::sources(
        &[
            ("agencies.ron", testkit::AGENCIES),
            ("monthly.ron", MONTHLY),
        ],
        calendar,
    ))
}

fn start_monthly(lib: &Library, now: DateTime<Utc>) -> Result<Step, Rejection> {
    start(
        lib,
        "monthly",
        "m1",
        "c",
        &BTreeMap::new(),
        &JsonMap::new(),
        now,
    )
}

#[test]
fn an_anchored_deadline_is_postponed_over_holidays_and_records_the_calendar() {
    let lib = monthly_library(Some(testkit::CALENDAR));
    let version = lib.calendar.as_ref().map(|c| c.version().to_owned());
    let step = ok(start_monthly(&lib, at("2020-09-15T10:00:00+08:00")));
    assert_eq!(step.entry.calendar_version, version);
    let case = step.case;
    // 2020-10-01..08 are holidays: due by the end of Friday 10-09; the reminder one
    // working day before that day is the end of Wednesday 09-30.
    let expiry = &case.timers[1];
    assert_eq!(
        (expiry.kind, expiry.due),
        (TimerKind::Expiry, at("2020-10-10T00:00:00+08:00"))
    );
    assert_eq!(Some(expiry.calendar_version.clone()), version);
    assert_eq!(case.timers[0].kind, TimerKind::Reminder);
    assert_eq!(case.timers[0].due, at("2020-10-01T00:00:00+08:00"));
    // On expiry (a midnight), the next state's quarter is the one that midnight begins
    // in: the fourth, so its deadline is the end of 2020, not at once.
    let late = ok(fire_timer(&lib, &case, &expiry.id, expiry.due)).case;
    assert_eq!(late.state, "overdue");
    assert_eq!(late.timers[0].due, at("2021-01-01T00:00:00+08:00"));
    // Deterministic: the same start gives the same timers.
    let again = ok(start_monthly(&lib, at("2020-09-15T10:00:00+08:00"))).case;
    assert_eq!(again.timers, case.timers);
}

#[test]
fn an_anchored_deadline_outside_the_calendar_is_a_calendar_rejection() {
    let lib = monthly_library(Some(testkit::CALENDAR));
    // The test calendar covers 2020 only: 2021-01-01 cannot be postponed over.
    let e = err(start_monthly(&lib, at("2020-12-10T10:00:00+08:00")));
    assert_eq!(e.code, RejectCode::Calendar);
    assert!(e.message.contains("deadline of state `reporting`"), "{e}");
    assert!(e.message.contains("does not cover 2021-01-01"), "{e}");
    // Postponing needs the calendar; the end of a quarter does not.
    let without = monthly_library(None);
    let e = err(start_monthly(&without, at("2020-09-15T10:00:00+08:00")));
    assert_eq!(e.code, RejectCode::Calendar);
    assert!(e.message.contains("none is loaded"), "{e}");
}

#[test]
fn a_day_on_the_calendar_is_no_length_of_time() {
    let day = Period::DayOf {
        day: 1,
        of: crate::lang::model::Span::NextMonth,
        postpone_over_holidays: true,
    };
    let e = period(&day, &BTreeMap::new()).unwrap_err();
    assert!(e.contains("not a length of time"), "{e}");
    assert_eq!(
        day.to_string(),
        "by day 1 of next month, postponed over holidays"
    );
}

//! Every construct of the language parses from RON and validates
//! (`tests/data/valid/all_constructs.ron` uses each one).

use std::path::{Path, PathBuf};

use govflow::calendar::Calendar;
use govflow::lang::diag::Severity;
use govflow::lang::load::{Sources, load};
use govflow::lang::model::{
    Amount, Binding, Effect, Level, Period, Quorum, RejectRule, Span, Type, WaitFor,
};
use govflow::lang::validate::validate;

fn valid_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/valid")
}

/// `tests/data/valid` with the shipped working-day calendar, which the folder
/// itself does not have.
fn valid_with_calendar() -> Sources {
    let mut sources = load(&[valid_dir()]).expect("loads");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/calendar/cn_holidays.csv");
    let calendar = Calendar::load(&path).expect("the shipped calendar loads");
    sources.calendar = Some((path, calendar));
    sources
}

/// Regression: a folder without `calendar/` validated clean, and a case then
/// failed on a working-day deadline ("working days need the working-day
/// calendar, and none is loaded"). Each deadline needing the calendar is a
/// located warning (the workflows still compile), and none is left once the
/// calendar is there.
#[test]
fn deadlines_needing_the_calendar_are_warned_of_when_none_is_loaded() {
    let validated = validate(&load(&[valid_dir()]).expect("loads"));
    assert!(
        validated.library.is_some(),
        "warnings do not stop compiling"
    );
    let warnings: Vec<(usize, usize, Severity, &str, &str)> = validated
        .diagnostics
        .iter()
        .map(|d| (d.line, d.col, d.severity, d.code, d.path.as_str()))
        .collect();
    assert_eq!(
        warnings,
        [
            (
                46,
                40,
                Severity::Warning,
                "missing-calendar",
                "states[1].deadline.within"
            ),
            (
                46,
                91,
                Severity::Warning,
                "missing-calendar",
                "states[1].deadline.reminders[0]"
            ),
            (
                81,
                93,
                Severity::Warning,
                "missing-calendar",
                "states[4].deadline.within.postpone_over_holidays"
            ),
            (
                82,
                29,
                Severity::Warning,
                "missing-calendar",
                "states[4].deadline.reminders[0]"
            ),
        ]
    );
    let first = &validated.diagnostics[0];
    assert!(first.file.ends_with("all_constructs.ron"), "{first}");
    assert_eq!(
        first.message,
        "the deadline of state `handling` counts 5 working days, and no working-day calendar is loaded"
    );
    assert_eq!(
        first.hint.as_deref(),
        Some(
            "add the calendar file (calendar/*.csv) beside the workflows: without it, entering state `handling` is rejected"
        )
    );
    assert_eq!(
        validated.diagnostics[1].message,
        "a reminder of state `handling` counts 1 working day before the deadline, and no working-day calendar is loaded"
    );
    assert_eq!(validate(&valid_with_calendar()).diagnostics, vec![]);
}

/// Regression: a workflow validated alone, with no agency directory beside
/// it, passed with a misspelt `Fixed` agency, which the server's deploy then
/// refused. Without a directory each workflow is now warned of it.
#[test]
fn a_workflow_validated_without_an_agency_directory_is_warned_that_its_agencies_went_unchecked() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string(valid_dir().join("item_filing.ron")).expect("read");
    let alone = scratch.path().join("item_filing.ron");
    std::fs::write(&alone, text).expect("write");
    let validated = validate(&load(&[alone]).expect("loads"));
    assert!(validated.library.is_some(), "a warning only");
    let warned: Vec<(Severity, &str, &str)> = validated
        .diagnostics
        .iter()
        .filter(|d| d.code != "missing-calendar")
        .map(|d| (d.severity, d.code, d.path.as_str()))
        .collect();
    assert_eq!(
        warned,
        [(Severity::Warning, "missing-directory", "roles")],
        "{:#?}",
        validated.diagnostics
    );
    // With the directory beside it, nothing to warn of.
    let with_directory = validate(&valid_with_calendar());
    assert!(
        with_directory
            .diagnostics
            .iter()
            .all(|d| d.code != "missing-directory")
    );
}

/// Regression: "remind 1 working days before".
#[test]
fn periods_are_singular_for_one() {
    let fixed = |n| Amount::Fixed(n);
    for (period, text) in [
        (Period::WorkingDays(fixed(1)), "1 working day"),
        (Period::WorkingDays(fixed(2)), "2 working days"),
        (Period::Days(fixed(1)), "1 day"),
        (Period::Days(fixed(0)), "0 days"),
        (Period::Hours(fixed(1)), "1 hour"),
        (Period::Hours(fixed(48)), "48 hours"),
        (
            Period::WorkingDays(Amount::Variable("limit".into())),
            "vars.limit working days",
        ),
    ] {
        assert_eq!(period.to_string(), text);
    }
}

#[test]
fn every_construct_parses_validates_and_compiles() {
    let validated = validate(&valid_with_calendar());
    assert_eq!(validated.diagnostics, vec![]);
    let library = validated
        .library
        .expect("a library when there are no errors");
    assert!(library.catalogues.contains_key("items"));
    assert_eq!(library.directory.len(), 4);
    let compiled = &library.workflows["all_constructs"];
    let w = &compiled.def;

    // Role bindings: every kind.
    let bindings: Vec<&Binding> = w.roles.iter().map(|r| &r.binding).collect();
    assert!(bindings.contains(&&Binding::Fixed("hebei.sjz.platform".into())));
    assert!(bindings.contains(&&Binding::Starter));
    assert!(bindings.contains(&&Binding::Variable("county".into())));
    assert!(bindings.contains(&&Binding::ParentOf("county_gov".into())));
    assert!(bindings.contains(&&Binding::AncestorOf {
        role: "county_gov".into(),
        level: Level::Province
    }));
    assert!(bindings.contains(&&Binding::Given));
    assert!(bindings.contains(&&Binding::Expr("roles.city_gov".into())));

    // Typed variables with defaults, one searchable.
    let types: Vec<&Type> = w.variables.iter().map(|v| &v.ty).collect();
    for ty in [
        Type::Agency,
        Type::String,
        Type::Integer,
        Type::Decimal,
        Type::Boolean,
        Type::Date,
        Type::Time,
    ] {
        assert!(types.contains(&&ty), "{ty:?}");
    }
    assert!(
        types
            .iter()
            .any(|t| matches!(t, Type::Enum(v) if v.len() == 3))
    );
    assert!(types.contains(&&Type::List(Box::new(Type::String))));
    assert!(w.variables.iter().any(|v| v.searchable));
    assert!(w.variables.iter().filter(|v| v.default.is_some()).count() >= 5);

    // States: titles in Chinese, terminal outcomes.
    assert!(w.states.iter().all(|s| !s.title.is_ascii()));
    let outcomes: Vec<&str> = w
        .states
        .iter()
        .filter_map(|s| s.outcome.as_deref())
        .collect();
    assert_eq!(outcomes, ["resolved", "refused"]);

    // Deadlines in every unit, a count held in a variable, reminders.
    let periods: Vec<&Period> = w
        .states
        .iter()
        .filter_map(|s| s.deadline.as_ref())
        .map(|d| &d.within)
        .collect();
    assert!(periods.contains(&&Period::Hours(Amount::Fixed(48))));
    assert!(periods.contains(&&Period::WorkingDays(Amount::Fixed(5))));
    assert!(periods.contains(&&Period::Days(Amount::Variable("commit_days".into()))));
    // Days on the calendar: 下月1日前（节假日顺延）, and the last day of the quarter.
    assert!(periods.contains(&&Period::DayOf {
        day: 1,
        of: Span::NextMonth,
        postpone_over_holidays: true
    }));
    assert!(periods.contains(&&Period::LastDayOf {
        of: Span::ThisQuarter,
        postpone_over_holidays: false
    }));
    let handling = compiled.state("handling").expect("state");
    assert_eq!(
        handling.deadline.as_ref().map(|d| d.reminders.len()),
        Some(2)
    );

    // Countersign with quorum n-of-m and a rejection rule.
    let cs = compiled
        .state("joint_review")
        .and_then(|s| s.countersign.as_ref())
        .expect("countersign");
    assert_eq!(
        (cs.quorum, cs.on_reject, cs.roles.len()),
        (Quorum::AtLeast(2), RejectRule::CountAgainst, 3)
    );
    assert_eq!(
        (cs.sign_event.as_str(), cs.reject_event.as_str()),
        ("sign", "object")
    );

    // Child spawning routed through a catalogue, and the wait for children.
    let spawn = handling
        .transitions
        .iter()
        .find_map(|t| t.spawn.as_ref())
        .expect("spawn");
    assert_eq!(spawn.workflow, "'item_' + catalogues.items[item].way");
    assert_eq!(spawn.bindings.len(), 2);
    let wait = compiled
        .state("permits")
        .and_then(|s| s.children.as_ref())
        .expect("wait");
    assert_eq!(wait.wait, WaitFor::All);

    // Payload schema with optional fields; effects of both kinds; guards.
    let accept = &compiled.state("reported").expect("state").transitions[0];
    assert_eq!(accept.payload.iter().filter(|f| !f.required).count(), 4);
    let effects: Vec<&Effect> = handling
        .transitions
        .iter()
        .flat_map(|t| &t.effects)
        .collect();
    assert!(effects.iter().any(|e| matches!(e, Effect::Bind { .. })));
    assert!(effects.iter().any(|e| matches!(e, Effect::Set { .. })));

    // Every CEL expression was compiled once, at load time.
    for source in [
        "payload.permits.all(p, p in catalogues.items)",
        "vars.level == 'county' ? 'city' : 'province'",
        "'item_' + catalogues.items[item].way",
        "roles.city_gov",
        "vars.permits",
    ] {
        assert!(
            compiled.program(source).is_some(),
            "{source} was not compiled"
        );
    }
}

/// Regression: a workflows folder holding a link to itself or to its
/// parent (`self -> .`, `up -> ..`) was walked for ever, its memory
/// growing, and a pipe named `x.ron` blocked the read; `govflow serve
/// --workflows` on such a folder hung at start without a word. Linked
/// folders are now walked once, and only regular files are read.
#[cfg(unix)]
#[test]
fn loading_a_folder_follows_each_linked_folder_once_and_reads_only_regular_files() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let folder = scratch.path().join("workflows");
    crate::common::copy_tree(&valid_dir(), &folder);
    std::os::unix::fs::symlink(".", folder.join("self")).expect("link");
    std::os::unix::fs::symlink("..", folder.join("up")).expect("link");
    let fifo = folder.join("pipe.ron");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo runs");
    assert!(made.success());
    let sources = load(std::slice::from_ref(&folder)).expect("loads");
    let mut names: Vec<String> = sources.workflows().map(|(_, w)| w.name.clone()).collect();
    names.sort();
    assert_eq!(names, ["all_constructs", "item_abolish", "item_filing"]);
    // Named on its own, a pipe is refused, not waited on.
    let refused = load(std::slice::from_ref(&fifo)).err().expect("refused");
    assert!(
        refused.to_string().contains("not a regular file"),
        "{refused}"
    );
}

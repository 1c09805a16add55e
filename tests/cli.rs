//! The `govflow` binary as a user runs it: exit codes and output.

use std::path::Path;
use std::process::Command;

fn govflow() -> Command {
    Command::new(env!("CARGO_BIN_EXE_govflow"))
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn validate_reports_all_independent_mistakes_and_exits_1() {
    let out = govflow()
        .arg("validate")
        .arg(root().join("tests/data/invalid/several_mistakes.ron"))
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    for code in [
        "unknown-state",
        "unknown-role",
        "expr-syntax",
        "type-mismatch",
    ] {
        assert!(
            text.contains(&format!("error[{code}]")),
            "missing {code} in:\n{text}"
        );
    }
    assert!(
        text.lines().filter(|l| l.contains(": error[")).count() >= 5,
        "{text}"
    );
}

#[test]
fn validate_json_is_machine_readable() {
    let out = govflow()
        .args(["validate", "--format", "json"])
        .arg(root().join("tests/data/invalid/unknown_state.ron"))
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let first = &report["diagnostics"][0];
    assert_eq!(first["code"], "unknown-state");
    assert_eq!(first["line"], 9);
    assert_eq!(first["path"], "states[0].transitions[0].to");
    assert_eq!(first["hint"], "did you mean `county_handling`?");
}

#[test]
fn usage_errors_exit_2() {
    let missing = govflow()
        .args(["validate", "no/such/file.ron"])
        .output()
        .expect("runs");
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no/such/file.ron"));
    let no_args = govflow().arg("validate").output().expect("runs");
    assert_eq!(no_args.status.code(), Some(2));
}

/// The official annex is imported whether it was saved as UTF-8 or, as
/// Excel on Chinese Windows saves CSV files, as GB18030 (GBK).
#[test]
fn catalogue_import_rewrites_the_catalogue_and_validation_checks_its_totals() {
    let sample = root().join("tests/data/catalogue/official_sample.csv");
    let text = std::fs::read_to_string(&sample).expect("read");
    let (gbk, _, unmappable) = encoding_rs::GB18030.encode(&text);
    assert!(!unmappable);
    for (encoding, bytes) in [("UTF-8", text.as_bytes()), ("GB18030", &gbk[..])] {
        let dir = tempfile::tempdir().expect("temp dir");
        let csv = dir.path().join("annex.csv");
        std::fs::write(&csv, bytes).expect("write");
        let catalogue = dir.path().join("permits.ron");
        std::fs::copy(root().join("workflows/catalogues/permits.ron"), &catalogue).expect("copy");
        std::fs::copy(
            root().join("workflows/agencies.ron"),
            dir.path().join("agencies.ron"),
        )
        .expect("copy");
        let out = govflow()
            .args(["catalogue", "import", "--level", "hebei", "--csv"])
            .arg(&csv)
            .arg("--catalogue")
            .arg(&catalogue)
            .arg("--agencies")
            .arg(dir.path().join("agencies.ron"))
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{encoding}: {err}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("imported 6 hebei rows"),
            "{encoding}"
        );
        assert_eq!(
            err.contains("read as GB18030"),
            encoding == "GB18030",
            "{err}"
        );
        assert!(
            std::fs::read_to_string(&catalogue)
                .expect("read")
                .contains("食品"),
            "{encoding}: the Chinese text came through"
        );
        // Six official rows replaced seventeen placeholders: the declared totals no longer hold.
        let check = govflow()
            .arg("validate")
            .arg(dir.path())
            .output()
            .expect("runs");
        assert_eq!(check.status.code(), Some(1));
        let text = String::from_utf8_lossy(&check.stdout);
        assert!(
            text.contains("declares 17 rows with level = `hebei`, found 6"),
            "{text}"
        );
    }
}

#[test]
fn catalogue_import_of_a_bad_csv_names_the_line_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let catalogue = dir.path().join("permits.ron");
    std::fs::copy(root().join("workflows/catalogues/permits.ron"), &catalogue).expect("copy");
    let before = std::fs::read(&catalogue).expect("read");
    let csv = dir.path().join("bad.csv");
    std::fs::write(&csv, "事项名称,设定依据,审批层级和部门,改革方式,具体改革举措,事中事后监管措施\n食品经营许可,《食品安全法》,市场监管部门,取消,当场发证,双随机\n").expect("write");
    let out = govflow()
        .args(["catalogue", "import", "--level", "central", "--csv"])
        .arg(&csv)
        .arg("--catalogue")
        .arg(&catalogue)
        .arg("--agencies")
        .arg(root().join("workflows/agencies.ron"))
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.csv:2") && err.contains("取消"), "{err}");
    assert_eq!(std::fs::read(&catalogue).expect("read"), before);
}

/// Regression: an import whose ids clash with rows the catalogue keeps (an
/// `--id-prefix` of the other level) wrote a catalogue that no longer
/// validated, and said it had imported them.
#[test]
fn catalogue_import_that_would_give_two_rows_one_key_changes_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let catalogue = dir.path().join("permits.ron");
    std::fs::copy(root().join("workflows/catalogues/permits.ron"), &catalogue).expect("copy");
    let before = std::fs::read(&catalogue).expect("read");
    let out = govflow()
        .args(["catalogue", "import", "--level", "central", "--csv"])
        .arg(root().join("tests/data/catalogue/official_sample.csv"))
        .arg("--catalogue")
        .arg(&catalogue)
        .arg("--agencies")
        .arg(root().join("workflows/agencies.ron"))
        .args(["--id-prefix", "ZZFL-H-"])
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("appears in two rows") && err.contains("was not changed"),
        "{err}"
    );
    assert_eq!(std::fs::read(&catalogue).expect("read"), before);
}

/// Regression: a missing file's I/O error was printed twice (once in the
/// message, once as its cause). A relative path is shown with the folder it
/// was looked for in.
#[test]
fn a_missing_path_is_reported_once_with_where_it_was_looked_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = govflow()
        .current_dir(dir.path())
        .args(["validate", "no/such.ron"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stderr);
    // The child's working folder as it reads it: links resolved.
    let shown = dir.path().canonicalize().expect("canonical");
    assert_eq!(
        text.trim(),
        format!(
            "govflow: no/such.ron: no such file or folder (looked in {})",
            shown.display()
        )
    );
}

/// Regression: `govflow serve` run from another folder than the
/// repository's said only "workflows: No such file or directory".
#[test]
fn serve_from_another_folder_says_where_it_looked_for_the_workflows_and_how_to_name_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = govflow()
        .current_dir(dir.path())
        .args(["serve", "--data", "data", "--listen", "127.0.0.1:0"])
        .output()
        .expect("runs");
    assert_ne!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("the workflows folder: workflows: no such file or folder (looked in "),
        "{text}"
    );
    assert!(text.contains("name it with --workflows"), "{text}");
    assert!(
        !dir.path().join("data").exists(),
        "a data folder was made: {text}"
    );
}

/// `govflow serve` with `args` in a fresh data folder, expected to refuse to
/// start: its exit code and what it printed. It listens on a free port
/// unless `args` say where (the port is bound first: a default port taken
/// on this machine would be the refusal).
fn serve_refused(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    serve_refused_on(dir, &root().join("workflows"), args)
}

/// [`serve_refused`] on the workflows folder `workflows`.
fn serve_refused_on(dir: &Path, workflows: &Path, args: &[&str]) -> (Option<i32>, String) {
    let listen: &[&str] = if args.contains(&"--listen") {
        &[]
    } else {
        &["--listen", "127.0.0.1:0"]
    };
    let out = govflow()
        .current_dir(dir)
        .args(["serve", "--data", "data", "--workflows"])
        .arg(workflows)
        .args(listen)
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Regression: a taken port, or a TLS file that cannot be used, was found
/// only after the server had printed that it was serving, and the port's
/// error called the address "the configuration".
#[test]
fn serve_refuses_a_taken_port_or_unusable_tls_before_it_says_it_serves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = taken.local_addr().expect("addr").to_string();
    let (code, text) = serve_refused(dir.path(), &["--listen", &address]);
    assert_ne!(code, Some(0));
    assert!(
        text.contains(&format!("cannot listen on {address}: ")),
        "{text}"
    );
    assert!(!text.contains("serving"), "{text}");
    assert!(
        !dir.path().join("data").exists(),
        "a start refused for its port made the data folder (store, tokens)"
    );
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(dir.path().join("unmounted/data"), dir.path().join("linked"))
            .expect("link");
        let out = govflow()
            .current_dir(dir.path())
            .args([
                "serve",
                "--data",
                "linked",
                "--listen",
                "127.0.0.1:0",
                "--workflows",
            ])
            .arg(root().join("workflows"))
            .output()
            .expect("runs");
        let text = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0));
        assert!(text.contains("is a symbolic link to"), "{text}");
    }
    std::fs::write(dir.path().join("key.pem"), "not a key\n").expect("write");
    std::fs::write(dir.path().join("cert.pem"), "not a certificate\n").expect("write");
    for (config, text, said) in [
        (
            "auditor.toml",
            "auditors = [\"hebei.sjz.nosuch\"]\n",
            "`auditors` names `hebei.sjz.nosuch`, which is not an agency",
        ),
        (
            "missing.toml",
            "[tls]\ncert = \"nowhere.pem\"\nkey = \"key.pem\"\n",
            "reading the TLS certificate (cert) nowhere.pem",
        ),
        (
            "garbage.toml",
            "[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n",
            "the TLS certificate and key (`tls` in the configuration) cannot be used",
        ),
        (
            // Regression: the mapping was ignored, and its client refused.
            "no-ca.toml",
            "[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n[client_certificates]\n\"sha256:00\" = \"hebei.sjz.tax\"\n",
            "without `[tls]` and its `client_ca` no client is asked for one",
        ),
    ] {
        std::fs::write(dir.path().join(config), text).expect("write");
        let (code, text) = serve_refused(dir.path(), &["--config", config]);
        assert_ne!(code, Some(0), "{config}");
        assert!(text.contains(said), "{config}: {text}");
        assert!(!text.contains("serving"), "{config}: {text}");
        assert!(
            !dir.path().join("data").exists(),
            "{config}: a refused start made the data folder"
        );
    }
    // Paths a configuration file sets are read from its own folder.
    std::fs::create_dir(dir.path().join("etc")).expect("mkdir");
    std::fs::write(
        dir.path().join("etc/govflow.toml"),
        "[tls]\ncert = \"server.pem\"\nkey = \"server.key\"\n",
    )
    .expect("write");
    let (code, text) = serve_refused(dir.path(), &["--config", "etc/govflow.toml"]);
    assert_ne!(code, Some(0));
    assert!(
        text.contains(&format!(
            "(cert) {}",
            Path::new("etc").join("server.pem").display()
        )),
        "{text}"
    );
    // Regression: a start refused for its workflows still made the data
    // folder and an empty store in it.
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).expect("mkdir");
    for file in ["agencies.ron", "gaozhi_chengnuo.ron"] {
        std::fs::copy(root().join("workflows").join(file), broken.join(file)).expect("copy");
    }
    std::fs::write(broken.join("bad.ron"), "Workflow(name: \"bad\")").expect("write");
    let (code, text) = serve_refused_on(dir.path(), &broken, &[]);
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("the workflows do not validate"), "{text}");
    assert!(
        !dir.path().join("data").exists(),
        "a start refused for its workflows made the data folder"
    );
}

/// `govflow serve` logs one line per call, with the caller (never its
/// token), the status code and reason, also for calls it refuses.
#[test]
fn serve_logs_each_call_with_its_caller_and_status() {
    use std::io::Read;
    let dir = tempfile::tempdir().expect("tempdir");
    let address = {
        let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        free.local_addr().expect("addr").to_string()
    };
    let (mut server, mut log, _) = serve_until_serving(dir.path(), &address);
    let tokens: toml::Table = toml::from_str(
        &std::fs::read_to_string(dir.path().join("data/credentials.toml")).expect("tokens"),
    )
    .expect("toml");
    let tax = tokens["tokens"]["hebei.sjz.tax"].as_str().expect("token");
    let shown = govflow()
        .args(["case", "show", "nope", "--server", &address, "--token", tax])
        .output()
        .expect("runs");
    assert_ne!(shown.status.code(), Some(0));
    // With --json a refusal is a JSON answer on standard output, for scripts.
    let shown = govflow()
        .args([
            "case", "show", "nope", "--json", "--server", &address, "--token", tax,
        ])
        .output()
        .expect("runs");
    assert_eq!(shown.status.code(), Some(1));
    let refusal: serde_json::Value =
        serde_json::from_slice(&shown.stdout).expect("a JSON refusal on stdout");
    assert_eq!(refusal["error"]["code"], "NotFound");
    assert_eq!(refusal["error"]["reason"], "case-not-found");
    let listed = govflow()
        .args(["case", "list", "--server", &address])
        .env_remove("GOVFLOW_TOKEN")
        .output()
        .expect("runs");
    assert_ne!(listed.status.code(), Some(0));
    let listed = govflow()
        .args(["case", "list", "--server", &address, "--token", tax])
        .output()
        .expect("runs");
    assert_eq!(listed.status.code(), Some(0));
    // Stopped as a service manager stops it: the log is written out on the way.
    let stopped = std::process::Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(stopped.success());
    assert!(server.wait().expect("waits").success());
    let mut rest = String::new();
    log.read_to_string(&mut rest).expect("read");
    assert!(
        rest.contains(r#"method="/govflow.v1.CasesService/GetCase" caller="hebei.sjz.tax" code=NotFound reason="case-not-found""#),
        "{rest}"
    );
    assert!(
        rest.contains(r#"method="/govflow.v1.CasesService/ListCases" caller="-" code=Unauthenticated reason="no-credential""#),
        "{rest}"
    );
    assert!(
        rest.contains(
            r#"method="/govflow.v1.CasesService/ListCases" caller="hebei.sjz.tax" code=Ok"#
        ),
        "{rest}"
    );
    assert!(!rest.contains(tax), "a token was logged");
}

/// Regression: a data folder that is a file was reported as "storage I/O on
/// FILE/store: Not a directory", after the credentials were looked for in it.
#[test]
fn serve_names_a_data_folder_that_is_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("data");
    std::fs::write(&file, "not a folder").expect("write");
    let (code, text) = serve_refused(dir.path(), &[]);
    assert_ne!(code, Some(0));
    assert!(
        text.contains("the data folder data: it is a file, not a folder"),
        "{text}"
    );
    assert_eq!(
        std::fs::read_to_string(&file).expect("read"),
        "not a folder"
    );
}

/// Regression: workflow names were not checked, and `--draw` wrote
/// `{name}.svg` under the pictures folder: a workflow named `../escaped` was
/// drawn outside it. The name is now a `bad-name` error, and not drawn.
#[test]
fn a_workflow_named_like_a_path_is_refused_and_not_drawn_outside_the_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path().to_path_buf();
    std::fs::copy(
        root().join("tests/data/invalid/bad_name.ron"),
        work.join("bad_name.ron"),
    )
    .expect("copy");
    let out = govflow()
        .args(["validate"])
        .arg(work.join("bad_name.ron"))
        .arg("--draw")
        .arg(work.join("pictures"))
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("error[bad-name]"), "{text}");
    // `pictures/../escaped.svg` would be in `work`, beside the workflow.
    let mut beside: Vec<_> = std::fs::read_dir(&work)
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    beside.sort();
    assert_eq!(beside, ["bad_name.ron", "pictures"], "{text}");
}

/// What `govflow case list` against a port nothing listens on says, with
/// `token` as GOVFLOW_TOKEN (it must fail).
fn listing_nowhere_says(token: &str) -> String {
    let refused = govflow()
        .args(["case", "list", "--server", "127.0.0.1:1"])
        .env("GOVFLOW_TOKEN", token)
        .output()
        .expect("runs");
    assert_ne!(refused.status.code(), Some(0));
    String::from_utf8_lossy(&refused.stderr).into_owned()
}

/// Regression: an empty token (a `$(grep …)` that found nothing) was sent
/// as `Bearer `; it is said at once, before anything is sent.
#[test]
fn an_empty_token_is_refused_before_anything_is_sent() {
    let said = listing_nowhere_says("");
    assert!(said.contains("the token is empty"), "{said}");
}

/// A server that is not there is said with what to check.
#[test]
fn a_server_that_cannot_be_reached_is_said_with_what_to_check() {
    let said = listing_nowhere_says("gf_0123456789abcdef0123456789abcdef");
    assert!(
        said.contains("cannot reach the server at http://127.0.0.1:1")
            && said.contains("--server or GOVFLOW_SERVER"),
        "{said}"
    );
    // Regression: with --json it was a plain line on stderr and nothing on
    // stdout, so a script had no answer to read.
    let refused = govflow()
        .args(["case", "list", "--json", "--server", "127.0.0.1:1"])
        .env("GOVFLOW_TOKEN", "gf_0123456789abcdef0123456789abcdef")
        .output()
        .expect("runs");
    assert_eq!(refused.status.code(), Some(1));
    let answer: serde_json::Value =
        serde_json::from_slice(&refused.stdout).expect("a JSON answer on stdout");
    assert_eq!(answer["error"]["code"], "Unavailable");
    assert_eq!(answer["error"]["reason"], "unreachable");
    assert!(
        answer["error"]["hint"]
            .as_str()
            .is_some_and(|h| h.contains("--server"))
    );
}

/// `govflow serve --data data` in `dir` on `listen` until it says it is
/// serving: the server, its log from there on, and what it wrote before.
fn serve_until_serving(
    dir: &Path,
    listen: &str,
) -> (
    std::process::Child,
    std::io::BufReader<std::process::ChildStderr>,
    String,
) {
    use std::io::BufRead;
    let mut server = govflow()
        .current_dir(dir)
        .args(["serve", "--data", "data", "--listen", listen, "--workflows"])
        .arg(root().join("workflows"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starts");
    let mut log = std::io::BufReader::new(server.stderr.take().expect("stderr"));
    let mut said = String::new();
    let mut line = String::new();
    while !line.contains("serving") {
        line.clear();
        assert_ne!(log.read_line(&mut line).expect("read"), 0, "ended: {said}");
        said.push_str(&line);
    }
    (server, log, said)
}

/// [`serve_until_serving`] on a free port, the rest of its log drained so
/// that a full pipe never blocks the server.
fn serve_quietly(dir: &Path) -> (std::process::Child, String) {
    let (server, mut log, said) = serve_until_serving(dir, "127.0.0.1:0");
    std::thread::spawn(move || std::io::copy(&mut log, &mut std::io::sink()));
    (server, said)
}

fn stop(mut server: std::process::Child) {
    let stopped = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(stopped.success());
    server.wait().expect("ends");
}

/// Regression: a data folder whose store was lost (deleted, restored
/// without it) was served empty without a word, and one whose tokens file
/// was lost got new tokens for every agency as silently as a first start.
#[test]
fn a_lost_store_or_tokens_file_is_said_loudly_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, first) = serve_quietly(dir.path());
    stop(server);
    assert!(!first.contains("was in use before"), "{first}");
    std::fs::remove_dir_all(dir.path().join("data/store")).expect("remove the store");
    let (server, said) = serve_quietly(dir.path());
    stop(server);
    assert!(
        said.contains("is empty, but this data folder was in use before"),
        "{said}"
    );
    std::fs::remove_file(dir.path().join("data/credentials.toml")).expect("remove tokens");
    let (server, said) = serve_quietly(dir.path());
    stop(server);
    assert!(said.contains("new tokens generated in"), "{said}");
    assert!(!said.contains("is empty, but"), "{said}");
}

/// `--min-coverage` holds the workflows the scenarios exercise to it, as
/// its help says; it no longer also failed every workflow without one, and
/// a value that is no percentage is a usage error (NaN turned the gate off).
#[test]
fn the_coverage_gate_holds_exercised_workflows_and_takes_only_percentages() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        root().join("workflows/agencies.ron"),
        dir.path().join("agencies.ron"),
    )
    .expect("copy");
    let workflow = |name: &str| {
        format!(
            r#"Workflow(
    name: "{name}",
    title: "覆盖",
    roles: [Role(name: "office", binding: Starter)],
    start: "open",
    states: [
        State(name: "open", title: "办理", transitions: [
            Transition(event: "close", to: "done", roles: ["office"]),
            Transition(event: "drop", to: "dropped", roles: ["office"]),
        ]),
        State(name: "done", title: "完成", outcome: "done"),
        State(name: "dropped", title: "撤回", outcome: "dropped"),
    ],
)"#
        )
    };
    std::fs::write(dir.path().join("tested.ron"), workflow("tested")).expect("write");
    std::fs::write(dir.path().join("idle.ron"), workflow("idle")).expect("write");
    std::fs::write(
        dir.path().join("closes.ron"),
        r#"Scenario(
    name: "办结",
    workflow: "tested",
    start: Start(at: "2020-06-01T09:00:00+08:00", by: "hebei.sjz"),
    steps: [Fire(event: "close", by: "hebei.sjz"), Expect(Expect(state: "done"))],
)"#,
    )
    .expect("write");
    let gate = |percent: &str| {
        govflow()
            .args(["test", "--min-coverage", percent])
            .arg(dir.path())
            .output()
            .expect("runs")
    };
    let half = gate("50");
    assert_eq!(
        half.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&half.stdout)
    );
    let more = gate("60");
    assert_eq!(more.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&more.stdout).contains("1 workflow below the required coverage")
    );
    for nonsense in ["NaN", "150", "-1"] {
        assert_eq!(gate(nonsense).status.code(), Some(2), "{nonsense}");
    }
}

/// Regression: `govflow validate` compiled expressions on the main thread,
/// whose stack a guard nested 60 brackets deep (well inside the language's
/// limits) overflowed in a debug build, aborting the process. Every command
/// now runs on a thread with the stack expressions may need.
#[test]
fn validate_compiles_a_deeply_nested_guard_without_overflowing_its_stack() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let guard = format!("{}true{}", "(".repeat(60), ")".repeat(60));
    let workflow = format!(
        r#"Workflow(
    name: "deep",
    title: "深",
    roles: [Role(name: "clerk", binding: Starter)],
    start: "open",
    states: [
        State(name: "open", title: "办理", transitions: [
            Transition(event: "close", to: "done", roles: ["clerk"], guard: "{guard}"),
        ]),
        State(name: "done", title: "完成", outcome: "done"),
    ],
)
"#
    );
    let file = scratch.path().join("deep.ron");
    std::fs::write(&file, workflow).expect("write");
    let out = govflow().arg("validate").arg(&file).output().expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("overflow"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}

/// Regression: `govflow serve` on a folder whose agencies.ron did not load
/// (a misspelt field) said the workflows define no agency directory, where
/// `govflow validate` located the mistake. It now gives the same located
/// diagnostics.
#[test]
fn serve_locates_a_mistake_in_the_agency_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let workflows = dir.path().join("workflows");
    crate::common::copy_tree(&root().join("workflows"), &workflows);
    let directory = workflows.join("agencies.ron");
    let text = std::fs::read_to_string(&directory).expect("read");
    std::fs::write(&directory, text.replacen("Agency(id", "Agency(idd", 1)).expect("write");
    let (code, stderr) = serve_refused_on(dir.path(), &workflows, &[]);
    assert_ne!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("define no agency directory"), "{stderr}");
    assert!(stderr.contains("agencies.ron:"), "{stderr}");
    assert!(stderr.contains("idd"), "{stderr}");
}

/// Regression: `govflow validate` passed a scenario with a misspelt event,
/// state, variable, role or agency, and `govflow test` then failed it by
/// step number. Each is now a located error of `validate`, and `test` still
/// runs the other scenarios.
#[test]
fn validate_locates_the_misspelt_names_of_a_scenario() {
    let dir = tempfile::tempdir().expect("tempdir");
    let workflows = dir.path().join("workflows");
    crate::common::copy_tree(&root().join("workflows"), &workflows);
    let good = workflows.join("scenarios/gaozhi/conditions_rectified_may_operate.ron");
    let text = std::fs::read_to_string(&good).expect("read");
    let typos = text
        .replacen("Fire(event: \"apply\"", "Fire(event: \"aply\"", 1)
        .replacen("\"hebei.sjz.culture\"", "\"hebei.sjz.cultur\"", 1)
        .replacen("\"enterprise_name\":", "\"enterprise_nam\":", 1);
    std::fs::write(workflows.join("scenarios/gaozhi/typos.ron"), typos).expect("write");
    // And one that does not parse (a comma left out): it stopped every
    // scenario, blamed on the workflows.
    std::fs::write(
        workflows.join("scenarios/gaozhi/broken.ron"),
        "Scenario(name: \"坏\" workflow: \"gaozhi_chengnuo\")\n",
    )
    .expect("write");
    let out = govflow()
        .arg("validate")
        .arg(&workflows)
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    let said = format!("{stdout}{stderr}");
    for expected in [
        "typos.ron:20:69: error[unknown-agency]: no agency `hebei.sjz.cultur` in the directory",
        "typos.ron:24:31: error[unknown-variable]: workflow `gaozhi_chengnuo` has no variable `enterprise_nam`",
        "typos.ron:29:21: error[unknown-event]: workflow `gaozhi_chengnuo` has no event `aply`",
    ] {
        assert!(said.contains(expected), "{expected}:\n{said}");
    }
    let tested = govflow()
        .arg("test")
        .arg(&workflows)
        .output()
        .expect("runs");
    let report = String::from_utf8_lossy(&tested.stdout);
    assert_eq!(tested.status.code(), Some(1), "{report}");
    assert!(
        report.contains("ok   "),
        "the other scenarios run:\n{report}"
    );
    assert!(report.contains("broken.ron:1:"), "{report}");
    assert!(!report.contains("no scenario was run"), "{report}");
    assert!(
        report.contains("2 scenario files with mistakes"),
        "{report}"
    );
    assert!(
        report.contains("FAIL ") && report.contains("typos.ron"),
        "{report}"
    );
}

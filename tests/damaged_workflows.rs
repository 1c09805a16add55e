//! A workflow author's mistakes never crash govflow: the shipped workflows
//! folder, with one file damaged at random (spans cut or repeated,
//! characters replaced, an expression or string swapped for an odd one), is
//! loaded, checked and, when it still validates, its scenarios are run.
//! Each of those may fail with diagnostics; none may panic.
//!
//! `GOVFLOW_FUZZ_RUNS` sets how many damaged copies (40 by default),
//! `GOVFLOW_FUZZ_SEED` the first seed; a failure names its seed.

use std::path::{Path, PathBuf};

use crate::common::{copy_tree, env_or};

/// A small deterministic generator (xorshift64*), so that a seed replays.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// What may go in place of a string's contents: odd expressions, names,
/// durations, numbers and texts.
const ODD: &[&str] = &[
    "",
    " ",
    "vars.",
    "vars.amount +",
    "1 / 0",
    "1 % 0",
    "9223372036854775807 + 1",
    "-9223372036854775808 - 1",
    "99999999999999999999999999",
    "'a' + 1",
    "[1, 'a'][5]",
    "{'a': 1}['b']",
    "has(",
    "has(vars)",
    "payload[0]",
    "now - duration('1h')",
    "timestamp('not a time')",
    "duration('-99999999999h')",
    "size(vars)",
    "vars.amount.b.c.d",
    "agencies[actor.agency].level",
    "catalogues.permits['x'].category",
    "a ? b : c ? d : e",
    "((((((((((((((((((((1))))))))))))))))))))",
    "!!!!!!!!true",
    "'\\u0000'",
    "\\\\",
    "\u{0}",
    "长",
    "状态 名",
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "0.0.0",
    "1e309",
    "-0",
    "matches('a', '(')",
    "in",
    "null",
    "true && false || null",
];

/// Characters that break RON, CEL or CSV structure.
const BREAKERS: &[char] = &[
    '(', ')', '[', ']', '{', '}', ',', ':', '"', '\'', '\\', '/', '*', '#', '\n', ' ', '0', '9',
    '-', '.', 'r', '长', '\u{0}', ';',
];

/// Damages `text` in one to three places.
fn damage(text: &str, rng: &mut Rng) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for _ in 0..1 + rng.below(3) {
        let len = chars.len();
        let at = rng.below(len);
        let span = 1 + rng.below(24);
        let end = (at + span).min(len);
        match rng.below(5) {
            0 => {
                chars.drain(at..end);
            }
            1 => {
                let copy: Vec<char> = chars[at..end].to_vec();
                chars.splice(at..at, copy);
            }
            2 => {
                if at < len {
                    chars[at] = *rng.pick(BREAKERS);
                }
            }
            _ => {
                // Replace the contents of the string literal nearest after `at`.
                let Some(open) = chars[at..].iter().position(|&c| c == '"') else {
                    continue;
                };
                let open = at + open + 1;
                let Some(close) = chars[open..].iter().position(|&c| c == '"') else {
                    continue;
                };
                let odd: Vec<char> = rng.pick(ODD).chars().collect();
                chars.splice(open..open + close, odd);
            }
        }
    }
    chars.into_iter().collect()
}

fn files_under(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            files_under(&path, found);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("ron" | "csv")
        ) {
            found.push(path);
        }
    }
}

/// Loads, checks and (if it validates) runs the scenarios of `dir`.
fn check_and_run(dir: &Path) {
    let Ok(sources) = govflow::lang::load::load(&[dir.to_path_buf()]) else {
        return;
    };
    let validated = govflow::lang::validate::validate(&sources);
    for d in &validated.diagnostics {
        // Every diagnostic renders, with its place.
        let _ = d.to_string();
    }
    if let Some(library) = validated.library {
        let run = govflow::scenario::run::run(&sources, &library);
        let _ = run.passed();
    }
}

#[test]
fn damaged_workflow_folders_give_diagnostics_never_a_panic() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows");
    let mut files = Vec::new();
    files_under(&shipped, &mut files);
    files.sort();
    let runs: u64 = env_or("GOVFLOW_FUZZ_RUNS", 40);
    let first: u64 = env_or("GOVFLOW_FUZZ_SEED", 1);
    let mut panics = Vec::new();
    for seed in first..first + runs {
        let mut rng = Rng::new(seed);
        let file = rng.pick(&files);
        let relative = file.strip_prefix(&shipped).expect("under workflows");
        let text = std::fs::read_to_string(file).expect("read");
        let damaged = damage(&text, &mut rng);
        let dir = tempfile::tempdir().expect("tempdir");
        copy_tree(&shipped, dir.path());
        std::fs::write(dir.path().join(relative), &damaged).expect("write");
        let outcome = std::panic::catch_unwind(|| check_and_run(dir.path()));
        if outcome.is_err() {
            let kept = std::env::temp_dir().join(format!("govflow-fuzz-{seed}"));
            let _ = std::fs::remove_dir_all(&kept);
            copy_tree(dir.path(), &kept);
            panics.push(format!(
                "seed {seed}: damaged {} panicked (folder kept at {})",
                relative.display(),
                kept.display()
            ));
        }
    }
    assert!(panics.is_empty(), "{}", panics.join("\n"));
}

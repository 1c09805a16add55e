//! Reading workflow sources from disk: files and folders, each RON file
//! classified by the name of its top-level value.

use std::fs;
use std::path::{Path, PathBuf};

use ron::extensions::Extensions;
use serde::de::DeserializeOwned;

use super::diag::{Diagnostic, did_you_mean};
use super::locate::{LineCol, SourceMap};
use super::model::{Agencies, Catalogue, Workflow};
use crate::calendar::Calendar;
use crate::scenario::Scenario;

/// Errors that stop loading altogether (as opposed to diagnostics in a file).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The I/O error is part of the message, not a separate cause, so that
    /// a report of the whole chain says it once.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{0}: not a .ron file or a folder")]
    NotRon(PathBuf),
    /// A device, socket or pipe named like a source file: reading it could
    /// wait for ever.
    #[error("{0}: not a regular file (a pipe, socket or device), so it is not read")]
    NotRegular(PathBuf),
    /// A file or folder named to be loaded is not there; a relative name is
    /// shown with the folder it was looked for in, the usual mistake being to
    /// run govflow from another folder.
    #[error("{}: no such file or folder{}", path.display(), looked_in(path))]
    Missing { path: PathBuf },
}

fn looked_in(path: &Path) -> String {
    match std::env::current_dir() {
        Ok(dir) if path.is_relative() => format!(" (looked in {})", dir.display()),
        _ => String::new(),
    }
}

/// One source file, with its text and positioned tree.
pub struct SourceFile {
    pub path: PathBuf,
    pub text: String,
    pub map: SourceMap,
}

/// What a RON file holds.
pub enum Document {
    Workflow(Workflow),
    Agencies(Agencies),
    Catalogue(Catalogue),
    Scenario(Scenario),
}

const KINDS: [&str; 4] = ["Workflow", "Agencies", "Catalogue", "Scenario"];

/// Everything loaded from a set of paths.
#[derive(Default)]
pub struct Sources {
    pub files: Vec<SourceFile>,
    /// Documents that parsed, with the index of their file.
    pub documents: Vec<(usize, Document)>,
    pub calendar: Option<(PathBuf, Calendar)>,
    /// Problems found while reading: syntax and type errors.
    pub diagnostics: Vec<Diagnostic>,
}

impl Sources {
    pub fn workflows(&self) -> impl Iterator<Item = (&SourceFile, &Workflow)> {
        self.documents.iter().filter_map(|(f, d)| match d {
            Document::Workflow(w) => Some((&self.files[*f], w)),
            _ => None,
        })
    }

    pub fn agencies(&self) -> Option<(&SourceFile, &Agencies)> {
        self.documents.iter().find_map(|(f, d)| match d {
            Document::Agencies(a) => Some((&self.files[*f], a)),
            _ => None,
        })
    }

    pub fn catalogues(&self) -> impl Iterator<Item = (&SourceFile, &Catalogue)> {
        self.documents.iter().filter_map(|(f, d)| match d {
            Document::Catalogue(c) => Some((&self.files[*f], c)),
            _ => None,
        })
    }

    pub fn scenarios(&self) -> impl Iterator<Item = (&SourceFile, &Scenario)> {
        self.documents.iter().filter_map(|(f, d)| match d {
            Document::Scenario(s) => Some((&self.files[*f], s)),
            _ => None,
        })
    }
}

/// The options every govflow RON file is read with: `Some(…)` may be left out.
pub fn ron_options() -> ron::Options {
    ron::Options::default().with_default_extension(Extensions::IMPLICIT_SOME)
}

/// Loads the given files and folders (recursively), plus the shared data that
/// sits beside them: `agencies.ron`, `catalogues/*.ron` and `calendar/*.csv`
/// of each named folder, or of a named file's folder or its parent, so that a
/// single workflow file is checked against the directory it will run with.
pub fn load(paths: &[PathBuf]) -> Result<Sources, LoadError> {
    let mut ron_files = Vec::new();
    let mut shared_dirs = Vec::new();
    for path in paths {
        let meta = fs::metadata(path).map_err(|error| match error.kind() {
            std::io::ErrorKind::NotFound => LoadError::Missing { path: path.clone() },
            _ => LoadError::Io {
                path: path.clone(),
                error,
            },
        })?;
        if meta.is_dir() {
            collect_ron(path, &mut ron_files)?;
            shared_dirs.push(path.clone());
        } else if !meta.is_file() {
            return Err(LoadError::NotRegular(path.clone()));
        } else if path.extension().is_some_and(|e| e == "ron") {
            ron_files.push(path.clone());
            if let Some(dir) = path.parent() {
                let dir = if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                };
                shared_dirs.push(dir.to_path_buf());
                shared_dirs.extend(dir.parent().map(Path::to_path_buf));
            }
        } else {
            return Err(LoadError::NotRon(path.clone()));
        }
    }
    let mut calendar_files = Vec::new();
    for dir in &shared_dirs {
        let agencies = dir.join("agencies.ron");
        if agencies.is_file() {
            ron_files.push(agencies);
        }
        let catalogues = dir.join("catalogues");
        if catalogues.is_dir() {
            collect_ron(&catalogues, &mut ron_files)?;
        }
        let calendar = dir.join("calendar");
        if calendar.is_dir() {
            collect_ext(&calendar, "csv", &mut calendar_files)?;
        }
    }
    dedup(&mut ron_files);
    dedup(&mut calendar_files);
    let mut texts = Vec::new();
    let mut read_diagnostics = Vec::new();
    for path in ron_files {
        match read_text(&path)? {
            Ok(text) => texts.push((path, text)),
            Err(diagnostic) => read_diagnostics.push(diagnostic),
        }
    }
    let mut calendar_diagnostics = Vec::new();
    let calendar = calendar_files
        .into_iter()
        .next()
        .and_then(|path| match Calendar::load(&path) {
            Ok(calendar) => Some((path, calendar)),
            Err(e) => {
                // At the line at fault, so that an editor goes to it.
                calendar_diagnostics.push(Diagnostic::at(
                    &path,
                    LineCol {
                        line: e.line().unwrap_or(1),
                        col: 1,
                    },
                    "calendar",
                    e.to_string(),
                ));
                None
            }
        });
    let mut sources = from_texts(texts, calendar);
    sources.diagnostics.extend(read_diagnostics);
    sources.diagnostics.extend(calendar_diagnostics);
    Ok(sources)
}

/// A source file's text, or, when it is no UTF-8 text (another encoding, a
/// binary file), the located diagnostic that says so: what `load` reads,
/// and what `govflow workflow deploy` sends.
pub fn read_text(path: &Path) -> Result<Result<String, Diagnostic>, LoadError> {
    let bytes = fs::read(path).map_err(|error| LoadError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    if let Some(encoding) = wide_encoding(&bytes) {
        return Ok(Err(not_utf8_but(path, encoding)));
    }
    if let Some(binary) = not_text(path, &bytes) {
        return Ok(Err(binary));
    }
    Ok(String::from_utf8(bytes).map_err(|e| not_utf8(path, e.as_bytes(), e.utf8_error())))
}

/// A file that is not UTF-8 (older Chinese editors save GBK or GB18030),
/// located at its first byte that is not.
fn not_utf8(path: &Path, bytes: &[u8], error: std::str::Utf8Error) -> Diagnostic {
    let valid = std::str::from_utf8(&bytes[..error.valid_up_to()]).unwrap_or_default();
    let line_start = valid.rfind('\n').map_or(0, |i| i + 1);
    let at = LineCol {
        line: valid.matches('\n').count() + 1,
        col: valid[line_start..].chars().count() + 1,
    };
    Diagnostic::at(
        path,
        at,
        "not-utf8",
        "the file is not UTF-8 text from here on, so it was not read",
    )
    .with_hint(Some(
        "save it as UTF-8 (a file saved as GBK or GB18030 needs converting, e.g. `iconv -f GB18030 -t UTF-8`)".to_owned(),
    ))
}

/// The encoding of a file saved as UTF-16 or UTF-32 (Notepad's "Unicode"),
/// by its byte-order mark, or without one by its NUL bytes: RON text is
/// mostly ASCII, which those encodings write with one or more zero bytes
/// each, and no UTF-8 text has a quarter of its bytes NUL. Read as UTF-8
/// such a file was refused at its first byte with a hint about GBK, or (all
/// ASCII, no mark) taken as text and refused as RON.
/// Its name, and the name `iconv` knows it by.
pub(crate) fn wide_encoding(bytes: &[u8]) -> Option<(&'static str, &'static str)> {
    let encoding = match bytes {
        [0xFF, 0xFE, 0, 0, ..] => ("UTF-32 (little-endian)", "UTF-32"),
        [0, 0, 0xFE, 0xFF, ..] => ("UTF-32 (big-endian)", "UTF-32"),
        [0xFF, 0xFE, ..] => ("UTF-16 (little-endian)", "UTF-16"),
        [0xFE, 0xFF, ..] => ("UTF-16 (big-endian)", "UTF-16"),
        _ => {
            // Mostly-ASCII text in a wide encoding has its zero bytes in
            // fixed places: every other byte (UTF-16), three of every four
            // (UTF-32). A binary file has them anywhere.
            let start = &bytes[..bytes.len().min(1024) / 4 * 4];
            if start.is_empty() {
                return None;
            }
            let zero_share = |step: usize, at: usize| {
                let column: Vec<u8> = start.iter().skip(at).step_by(step).copied().collect();
                column.iter().filter(|b| **b == 0).count() as f64 / column.len() as f64
            };
            let quarters: Vec<f64> = (0..4).map(|at| zero_share(4, at)).collect();
            let halves = [zero_share(2, 0), zero_share(2, 1)];
            if quarters.iter().filter(|s| **s >= 0.9).count() == 3
                && quarters.iter().any(|s| *s <= 0.1)
            {
                ("UTF-32", "UTF-32")
            } else if halves.iter().any(|s| *s >= 0.9) && halves.iter().any(|s| *s <= 0.1) {
                ("UTF-16", "UTF-16")
            } else {
                return None;
            }
        }
    };
    Some(encoding)
}

/// A file with NUL bytes in it that is no wide encoding: not text at all
/// (a program, a picture, a spreadsheet saved with a `.ron` name).
fn not_text(path: &Path, bytes: &[u8]) -> Option<Diagnostic> {
    let nul = bytes.iter().position(|b| *b == 0)?;
    Some(
        Diagnostic::at(
            path,
            LineCol { line: 1, col: 1 },
            "not-utf8",
            format!(
                "the file is not text (byte {} is NUL, as in binary files), so it was not read",
                nul + 1
            ),
        )
        .with_hint(Some(
            "a workflow is a RON text file saved as UTF-8".to_owned(),
        )),
    )
}

/// A file in an encoding [`wide_encoding`] recognised, which govflow does not read.
fn not_utf8_but(path: &Path, (encoding, iconv): (&str, &str)) -> Diagnostic {
    Diagnostic::at(
        path,
        LineCol { line: 1, col: 1 },
        "not-utf8",
        format!("the file is {encoding} text, not UTF-8, so it was not read"),
    )
    .with_hint(Some(format!(
        "save it as UTF-8 (in Notepad: Save As, Encoding \"UTF-8\"; or `iconv -f {iconv} -t UTF-8`)"
    )))
}

/// Sources from texts already in memory (a deploy, or files read by [`load`]).
/// Only the first agency directory counts: the nearest to what was named.
pub fn from_texts(files: Vec<(PathBuf, String)>, calendar: Option<(PathBuf, Calendar)>) -> Sources {
    let mut sources = Sources {
        calendar,
        ..Sources::default()
    };
    let mut have_agencies = false;
    for (path, text) in files {
        // A source sent as text (a deploy) is checked as a file read is.
        if let Some(binary) = not_text(&path, text.as_bytes()) {
            sources.diagnostics.push(binary);
            continue;
        }
        // Kept as read, so that the map's positions index into it.
        let text = source_text(&text).to_owned();
        let (map, document) = read_source(&path, &text, &mut sources.diagnostics);
        let index = sources.files.len();
        if let Some(Document::Agencies(_)) = &document {
            if have_agencies {
                continue;
            }
            have_agencies = true;
        }
        sources.files.push(SourceFile { path, text, map });
        if let Some(document) = document {
            sources.documents.push((index, document));
        }
    }
    sources
}

/// A source's text as govflow reads it: without the byte-order mark that
/// Windows editors (Notepad among them) put at the start of UTF-8 files.
pub fn source_text(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// Reads one source as govflow reads every source ([`source_text`]): the
/// map that locates its diagnostics, and its document if it parses.
pub fn read_source(
    path: &Path,
    text: &str,
    out: &mut Vec<Diagnostic>,
) -> (SourceMap, Option<Document>) {
    let text = source_text(text);
    let map = SourceMap::new(text);
    let document = parse_document(path, text, &map, out);
    for (key, at) in map.repeated_keys() {
        out.push(
            Diagnostic::at(
                path,
                at,
                "repeated-key",
                format!("key `{key}` is written twice in one map: only the last would count"),
            )
            .with_hint(Some("keep one of them".to_owned())),
        );
    }
    (map, document)
}

/// Parses one RON text, classified by its top-level name.
fn parse_document(
    path: &Path,
    text: &str,
    map: &SourceMap,
    out: &mut Vec<Diagnostic>,
) -> Option<Document> {
    let kind = map.root_name().unwrap_or("");
    match kind {
        "Workflow" => parse::<Workflow>(path, text, out).map(Document::Workflow),
        "Agencies" => parse::<Agencies>(path, text, out).map(Document::Agencies),
        "Catalogue" => parse::<Catalogue>(path, text, out).map(Document::Catalogue),
        "Scenario" => parse::<Scenario>(path, text, out).map(Document::Scenario),
        _ => {
            let message = if kind.is_empty() {
                "cannot tell what this file holds".to_owned()
            } else {
                format!("`{kind}` is not a kind of govflow file")
            };
            let hint = did_you_mean(kind, KINDS).or_else(|| {
                Some(format!(
                    "start the file with one of {}",
                    KINDS.map(|k| format!("`{k}(`")).join(", ")
                ))
            });
            out.push(
                Diagnostic::at(
                    path,
                    map.locate(&Default::default()),
                    "unknown-kind",
                    message,
                )
                .with_hint(hint),
            );
            None
        }
    }
}

/// Reads one RON value; a syntax or type error becomes a located diagnostic.
pub fn parse<T: DeserializeOwned>(path: &Path, text: &str, out: &mut Vec<Diagnostic>) -> Option<T> {
    match ron_options().from_str::<T>(text) {
        Ok(value) => Some(value),
        Err(e) => {
            let mut diagnostic = syntax_diagnostic(path, &e, text);
            if diagnostic.hint.is_none()
                && !matches!(
                    e.code,
                    ron::error::Error::TrailingCharacters
                        | ron::error::Error::MissingStructField { .. }
                )
                && at_end(text, e.span.start.line, e.span.start.col)
            {
                diagnostic.hint = Some(
                    "the file ends here, before its value is closed: a `)`, `]` or `}` may be missing at the end".into(),
                );
            }
            out.push(diagnostic);
            None
        }
    }
}

/// Whether `line:col` (as `ron` counts them) is at or past the last
/// character of `text` that is not white space: an error there (other than
/// trailing characters) means the file was cut short.
fn at_end(text: &str, line: usize, col: usize) -> bool {
    let body = text.trim_end();
    let last_line = body.lines().count().max(1);
    let last_col = body.rsplit('\n').next().map_or(0, |l| l.chars().count());
    (line, col) >= (last_line, last_col)
}

/// A `ron` error as a diagnostic; unknown fields and variants get a "did you mean".
fn syntax_diagnostic(path: &Path, e: &ron::error::SpannedError, text: &str) -> Diagnostic {
    use ron::error::Error;
    let at = past_blanks(
        text,
        LineCol {
            line: e.span.start.line,
            col: e.span.start.col,
        },
    );
    let hint = match &e.code {
        Error::NoSuchStructField {
            expected, found, ..
        } => did_you_mean(found, expected.iter().copied())
            .or_else(|| Some(format!("expected one of: {}", expected.join(", ")))),
        Error::NoSuchEnumVariant {
            expected, found, ..
        } => did_you_mean(found, expected.iter().copied())
            .or_else(|| Some(format!("expected one of: {}", expected.join(", ")))),
        // Reported where the struct closes: at the end of the file for a
        // workflow's own fields, which is no sign of a file cut short.
        Error::MissingStructField { field, outer } => {
            let to = outer
                .as_deref()
                .map(|o| format!(" to the `{o}`"))
                .unwrap_or_default();
            Some(format!(
                "add `{field}: …`{to}, before the `)` that closes it: the field is required"
            ))
        }
        // serde's words for a length that is neither a count nor a name.
        Error::Message(m) if m.contains("untagged enum Amount") => Some(
            "a length is a whole number, 0 or more (`Days(5)`), or the name of an Integer variable in quotes (`Days(\"commit_days\")`)".to_owned(),
        ),
        _ => None,
    }
    .or_else(|| full_width_hint(text, at));
    let message = match &e.code {
        // ron's own words name its options, which an author cannot set.
        Error::ExceededRecursionLimit => {
            "values are nested too deeply (more than 128 brackets inside one another)".to_owned()
        }
        other => other.to_string(),
    };
    Diagnostic::at(path, at, "syntax", message).with_hint(hint)
}

/// `at`, moved past the blanks it stands on to what follows on its line: ron
/// reports an unexpected token where the blanks before it begin.
fn past_blanks(text: &str, at: LineCol) -> LineCol {
    let Some(line) = at.line.checked_sub(1).and_then(|n| text.lines().nth(n)) else {
        return at;
    };
    let blanks = line
        .chars()
        .skip(at.col.saturating_sub(1))
        .take_while(|c| *c == ' ' || *c == '\t')
        .count();
    let rest = line.chars().nth(at.col.saturating_sub(1) + blanks);
    match rest {
        Some(_) if blanks > 0 => LineCol {
            col: at.col + blanks,
            ..at
        },
        _ => at,
    }
}

/// Full-width punctuation a Chinese input method types, and the ASCII RON reads.
const FULL_WIDTH: [(char, char); 14] = [
    ('，', ','),
    ('：', ':'),
    ('“', '"'),
    ('”', '"'),
    ('‘', '\''),
    ('’', '\''),
    ('（', '('),
    ('）', ')'),
    ('［', '['),
    ('］', ']'),
    ('【', '['),
    ('】', ']'),
    ('｛', '{'),
    ('｝', '}'),
];

/// A hint when full-width punctuation stands where the error is (ron
/// reports some such errors one character early): outside a string, RON
/// reads only the ASCII marks.
fn full_width_hint(text: &str, at: LineCol) -> Option<String> {
    let line = text.lines().nth(at.line.checked_sub(1)?)?;
    let (typed, ascii) = line
        .chars()
        .skip(at.col.saturating_sub(1))
        .take(3)
        .find_map(|c| FULL_WIDTH.iter().find(|(wide, _)| *wide == c))?;
    Some(format!(
        "`{typed}` is full-width punctuation (typed with a Chinese input method), which RON does not read: type the ASCII `{ascii}` (quote marks inside a string may stay)"
    ))
}

fn collect_ron(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    collect_ext(dir, "ron", out)
}

/// The files ending in `.ext` under `dir`, in name order. Linked folders are
/// followed, each once: a link back up the tree (`ln -s .. up`) would
/// otherwise be walked for ever. Only regular files are taken: a pipe named
/// `x.ron` would block the read.
fn collect_ext(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    walk(dir, ext, out, &mut std::collections::HashSet::new())
}

fn walk(
    dir: &Path,
    ext: &str,
    out: &mut Vec<PathBuf>,
    visited: &mut std::collections::HashSet<PathBuf>,
) -> Result<(), LoadError> {
    let io = |error| LoadError::Io {
        path: dir.to_path_buf(),
        error,
    };
    if !visited.insert(fs::canonicalize(dir).map_err(io)?) {
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io)?;
    entries.sort();
    for path in entries {
        if path.is_dir() {
            walk(&path, ext, out, visited)?;
        } else if path.is_file() && path.extension().is_some_and(|e| e == ext) {
            out.push(path);
        }
    }
    Ok(())
}

/// Removes repeated paths, keeping the first of each (paths may be spelt differently).
fn dedup(paths: &mut Vec<PathBuf>) {
    let mut seen = std::collections::HashSet::new();
    paths.retain(|p| seen.insert(fs::canonicalize(p).unwrap_or_else(|_| p.clone())));
}

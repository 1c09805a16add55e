//! Diagnostics: what is wrong, where (`file:line:col`), and a hint.

use std::fmt;
use std::path::Path;

use serde::Serialize;

use super::locate::{DocPath, LineCol, SourceMap};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One problem found in a source file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub severity: Severity,
    /// Stable machine-readable rule name, e.g. `unknown-state`.
    pub code: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// Path of the offending value inside the document, e.g. `states[2].to`.
    pub path: String,
}

impl Diagnostic {
    pub fn at(file: &Path, at: LineCol, code: &'static str, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.display().to_string(),
            line: at.line,
            col: at.col,
            severity: Severity::Error,
            code,
            message: message.into(),
            hint: None,
            path: String::new(),
        }
    }

    pub fn with_hint(mut self, hint: Option<String>) -> Self {
        self.hint = hint;
        self
    }

    pub fn warning(mut self) -> Self {
        self.severity = Severity::Warning;
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{}:{}:{}: {severity}[{}]: {}",
            self.file, self.line, self.col, self.code, self.message
        )?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// Collects diagnostics for one source file, locating each by document path.
pub struct Reporter<'a> {
    file: &'a Path,
    map: &'a SourceMap,
    out: &'a mut Vec<Diagnostic>,
}

impl<'a> Reporter<'a> {
    pub fn new(file: &'a Path, map: &'a SourceMap, out: &'a mut Vec<Diagnostic>) -> Self {
        Reporter { file, map, out }
    }

    pub fn map(&self) -> &SourceMap {
        self.map
    }

    /// Reports an error at the value `path` names.
    pub fn error(
        &mut self,
        code: &'static str,
        path: &DocPath,
        message: impl Into<String>,
        hint: Option<String>,
    ) {
        let at = self.map.locate(path);
        self.push_at(at, code, path, message, hint);
    }

    /// Reports a warning at the value `path` names: something that cannot
    /// be what the author meant, but that runs, so the workflow still loads.
    pub fn warning(
        &mut self,
        code: &'static str,
        path: &DocPath,
        message: impl Into<String>,
        hint: Option<String>,
    ) {
        self.error(code, path, message, hint);
        if let Some(last) = self.out.last_mut() {
            last.severity = Severity::Warning;
        }
    }

    /// Reports an error at an exact position (inside a CEL expression).
    pub fn push_at(
        &mut self,
        at: LineCol,
        code: &'static str,
        path: &DocPath,
        message: impl Into<String>,
        hint: Option<String>,
    ) {
        let mut d = Diagnostic::at(self.file, at, code, message).with_hint(hint);
        d.path = path.to_string();
        self.out.push(d);
    }
}

/// "did you mean `x`?" for the closest of `candidates`, when one is close enough.
pub fn did_you_mean<'c>(
    name: &str,
    candidates: impl IntoIterator<Item = &'c str>,
) -> Option<String> {
    // A name this long is no slip of the keyboard, and comparing it costs
    // time in proportion to its length times each candidate's: a caller
    // sending a megabyte of name would hold whoever runs this.
    if name.len() > MAX_SUGGESTED_NAME {
        return None;
    }
    let best = candidates
        .into_iter()
        .take(MAX_COMPARED)
        .map(|c| (strsim::jaro_winkler(name, c), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))?;
    Some(format!("did you mean `{}`?", best.1))
}

/// Names longer than this (in bytes) get no "did you mean": no name is
/// written that long, and each comparison costs the product of the lengths.
const MAX_SUGGESTED_NAME: usize = 96;

/// At most this many candidates are compared with an unknown name: a source
/// of thousands of unknown names among thousands of declared ones took a
/// minute of CPU to validate.
const MAX_COMPARED: usize = 2000;

/// At most this many names are listed in a hint: a file declaring thousands
/// would otherwise repeat them all in each diagnostic.
const MAX_LISTED: usize = 20;

/// A hint listing what is allowed, for when nothing is close.
pub fn one_of<'c>(what: &str, candidates: impl IntoIterator<Item = &'c str>) -> Option<String> {
    let mut candidates = candidates.into_iter();
    let list: Vec<&str> = candidates.by_ref().take(MAX_LISTED).collect();
    if list.is_empty() {
        return Some(format!("there are no {what}"));
    }
    let more = candidates.count();
    Some(if more == 0 {
        format!("declared {what}: {}", list.join(", "))
    } else {
        format!("declared {what}: {}, … ({more} more)", list.join(", "))
    })
}

/// The best hint for an unknown name: a close match, else the list of names.
pub fn hint_for<'c>(
    name: &str,
    what: &str,
    candidates: impl IntoIterator<Item = &'c str> + Clone,
) -> Option<String> {
    did_you_mean(name, candidates.clone()).or_else(|| one_of(what, candidates))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_names_are_suggested() {
        let names = ["county_handling", "city_handling", "closed"];
        assert_eq!(
            did_you_mean("county_handlin", names),
            Some("did you mean `county_handling`?".into())
        );
        assert_eq!(did_you_mean("zzz", names), None);
        assert_eq!(
            hint_for("zzz", "states", names),
            Some("declared states: county_handling, city_handling, closed".into())
        );
    }

    /// Regression: a hint listed every declared name (a 55 KB hint for each
    /// unknown name in a file of 8,000 variables, so a small request to
    /// ValidateWorkflow got an answer of hundreds of megabytes), and a
    /// megabyte-long unknown name was compared with every candidate (a
    /// second of the engine's time per start naming such an agency).
    #[test]
    fn hints_are_bounded_whatever_the_names() {
        let many: Vec<String> = (0..8000).map(|i| format!("v{i}")).collect();
        let hint = one_of("names", many.iter().map(String::as_str)).expect("a hint");
        assert!(hint.starts_with("declared names: v0, v1, "), "{hint}");
        assert!(hint.ends_with(", v19, … (7980 more)"), "{hint}");
        // Past the length bound nothing is compared, however close.
        let near = "x".repeat(MAX_SUGGESTED_NAME);
        let long = near.clone() + "y";
        assert!(did_you_mean(&near[1..], [near.as_str()]).is_some());
        assert_eq!(did_you_mean(&long, [near.as_str()]), None);
    }

    #[test]
    fn display_is_file_line_col_code_message_hint() {
        let d = Diagnostic::at(
            Path::new("a.ron"),
            LineCol { line: 3, col: 7 },
            "unknown-state",
            "no state `x`",
        )
        .with_hint(Some("did you mean `y`?".into()));
        assert_eq!(
            d.to_string(),
            "a.ron:3:7: error[unknown-state]: no state `x`\n  hint: did you mean `y`?"
        );
    }
}

//! Where things are in a RON source: document paths to `line:col`.
//!
//! `ron` does the real parsing and typing; it does not keep the position of
//! each value, which semantic diagnostics need. This module reads the same text
//! once more into a light tree of positioned nodes, so that a diagnostic can
//! name a value by its path (`states[2].transitions[0].to`) and be reported
//! exactly where that value is written. It is lenient by design: it only runs
//! on text that `ron` has already accepted, and an unlocatable path falls back
//! to its nearest located ancestor.

use std::fmt;
use std::iter::Peekable;
use std::str::CharIndices;

/// One step of a path into a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Field(String),
    Index(usize),
    Key(String),
}

/// A path into a document, root first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DocPath(pub Vec<Seg>);

impl DocPath {
    pub fn root() -> Self {
        DocPath(Vec::new())
    }

    pub fn field(&self, name: &str) -> Self {
        self.with(Seg::Field(name.to_owned()))
    }

    pub fn index(&self, i: usize) -> Self {
        self.with(Seg::Index(i))
    }

    pub fn key(&self, key: &str) -> Self {
        self.with(Seg::Key(key.to_owned()))
    }

    fn with(&self, seg: Seg) -> Self {
        let mut segs = self.0.clone();
        segs.push(seg);
        DocPath(segs)
    }
}

impl fmt::Display for DocPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Field(name) if i == 0 => write!(f, "{name}")?,
                Seg::Field(name) => write!(f, ".{name}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
                Seg::Key(k) => write!(f, "[{k:?}]")?,
            }
        }
        Ok(())
    }
}

/// A 1-based line and column; columns count characters, not bytes, so they
/// are right on lines with Chinese text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct LineCol {
    pub line: usize,
    pub col: usize,
}

impl fmt::Display for LineCol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

#[derive(Debug)]
enum Body {
    Fields(Vec<(String, Node)>),
    Items(Vec<Node>),
    Entries(Vec<(String, Node)>),
    Atom,
}

#[derive(Debug)]
struct Node {
    /// Byte offset where the value starts (its name, bracket or literal).
    start: usize,
    /// Name before the parenthesis, for `Name(...)`.
    name: Option<String>,
    body: Body,
}

/// The positioned tree of one RON text.
pub struct SourceMap {
    line_starts: Vec<usize>,
    text: String,
    root: Option<Node>,
}

impl SourceMap {
    pub fn new(text: &str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        let mut parser = Parser {
            text,
            tokens: tokenize(text),
            pos: 0,
            depth: 0,
        };
        let root = parser.value();
        SourceMap {
            line_starts,
            text: text.to_owned(),
            root,
        }
    }

    /// The name the document's top-level value is written with (`Workflow`, `Agencies`, …).
    pub fn root_name(&self) -> Option<&str> {
        self.root.as_ref().and_then(|n| n.name.as_deref())
    }

    /// Keys written twice in one map (`{"a": 1, "a": 2}`), which `ron` reads
    /// as the last one alone, silently: each repeat, and where its value is.
    pub fn repeated_keys(&self) -> Vec<(String, LineCol)> {
        fn walk(map: &SourceMap, node: &Node, out: &mut Vec<(String, LineCol)>) {
            match &node.body {
                Body::Entries(entries) => {
                    let mut seen = std::collections::HashSet::new();
                    for (key, value) in entries {
                        if !seen.insert(key) {
                            out.push((key.clone(), map.line_col(value.start)));
                        }
                        walk(map, value, out);
                    }
                }
                Body::Fields(fields) => fields.iter().for_each(|(_, v)| walk(map, v, out)),
                Body::Items(items) => items.iter().for_each(|v| walk(map, v, out)),
                Body::Atom => {}
            }
        }
        let mut out = Vec::new();
        if let Some(root) = &self.root {
            walk(self, root, &mut out);
        }
        out
    }

    /// Where the value at `path` starts, or its nearest located ancestor.
    pub fn locate(&self, path: &DocPath) -> LineCol {
        let Some(mut node) = self.root.as_ref() else {
            return LineCol { line: 1, col: 1 };
        };
        for seg in &path.0 {
            match step(node, seg) {
                Some(next) => node = next,
                None => break,
            }
        }
        self.line_col(node.start)
    }

    /// Where the character at 1-based `line` and `col` of the *decoded*
    /// string value at `path` is written (used to point inside CEL
    /// expressions, which are located in the string `ron` decoded). An escape
    /// (`\"`, `\\`, `\u{4e2d}`, …) is one decoded character written as
    /// several, and a `\n` escape starts a decoded line that is no line of
    /// the text; raw strings (`r#"…"#`) have no escapes. A position past the
    /// string's end is its closing quote.
    pub fn locate_in_string(&self, path: &DocPath, line: usize, col: usize) -> LineCol {
        let start = self.offset_of(self.locate(path));
        let hashes = self.text[start..]
            .strip_prefix('r')
            .map(|rest| rest.chars().take_while(|&c| c == '#').count());
        let body = start + hashes.map_or(0, |n| n + 1) + 1;
        let closing = format!("\"{}", "#".repeat(hashes.unwrap_or(0)));
        let mut chars = self.text[body..].char_indices().peekable();
        let mut decoded_at = (1, 1);
        let end = loop {
            let Some(&(i, c)) = chars.peek() else {
                break self.text.len();
            };
            // Escaped quotes are consumed with their backslash, so a quote
            // seen here ends the string.
            if decoded_at >= (line, col) || self.text[body + i..].starts_with(&closing) {
                break body + i;
            }
            chars.next();
            let decoded = if c == '\\' && hashes.is_none() {
                unescape(&mut chars)
            } else {
                c
            };
            decoded_at = if decoded == '\n' {
                (decoded_at.0 + 1, 1)
            } else {
                (decoded_at.0, decoded_at.1 + 1)
            };
        };
        self.line_col(end)
    }

    fn offset_of(&self, at: LineCol) -> usize {
        let line_start = self.line_starts[at.line - 1];
        self.text[line_start..]
            .char_indices()
            .nth(at.col - 1)
            .map_or(self.text.len(), |(i, _)| line_start + i)
    }

    /// Line and column of a byte offset.
    pub fn line_col(&self, offset: usize) -> LineCol {
        let line = self.line_starts.partition_point(|&s| s <= offset);
        let line_start = self.line_starts[line - 1];
        let col = self.text[line_start..offset.min(self.text.len())]
            .chars()
            .count()
            + 1;
        LineCol { line, col }
    }
}

/// The character a RON escape stands for, its backslash already taken from
/// `chars`, taking the rest of it as `ron` reads it: one character after the
/// backslash, `\u{…}` up to its brace, or `\xNN` repeated while the bytes
/// build one UTF-8 character.
fn unescape(chars: &mut Peekable<CharIndices<'_>>) -> char {
    const UNKNOWN: char = char::REPLACEMENT_CHARACTER;
    match chars.next().map(|(_, c)| c) {
        Some('n') => '\n',
        Some('r') => '\r',
        Some('t') => '\t',
        Some('0') => '\0',
        Some('u') => {
            let digits: String = chars
                .by_ref()
                .map(|(_, c)| c)
                .take_while(|&c| c != '}')
                .filter(char::is_ascii_hexdigit)
                .collect();
            u32::from_str_radix(&digits, 16)
                .ok()
                .and_then(char::from_u32)
                .unwrap_or(UNKNOWN)
        }
        Some('x') => {
            let mut bytes = Vec::new();
            loop {
                let hex: String = chars.by_ref().take(2).map(|(_, c)| c).collect();
                bytes.push(u8::from_str_radix(&hex, 16).unwrap_or(0));
                if let Ok(text) = std::str::from_utf8(&bytes) {
                    break text.chars().next().unwrap_or(UNKNOWN);
                }
                let more = bytes.len() < 4
                    && chars.next_if(|&(_, c)| c == '\\').is_some()
                    && chars.next_if(|&(_, c)| c == 'x').is_some();
                if !more {
                    break UNKNOWN;
                }
            }
        }
        Some(other) => other,
        None => UNKNOWN,
    }
}

fn step<'a>(node: &'a Node, seg: &Seg) -> Option<&'a Node> {
    // `Some(x)` and newtype variants are transparent to paths.
    if let (Body::Items(items), Some(_)) = (&node.body, &node.name)
        && items.len() == 1
        && !matches!(seg, Seg::Index(_))
    {
        return step(&items[0], seg);
    }
    match (&node.body, seg) {
        (Body::Fields(fields), Seg::Field(name)) => {
            fields.iter().find(|(n, _)| n == name).map(|(_, v)| v)
        }
        (Body::Items(items), Seg::Index(i)) => items.get(*i),
        (Body::Entries(entries), Seg::Key(k) | Seg::Field(k)) => {
            entries.iter().find(|(n, _)| n == k).map(|(_, v)| v)
        }
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Other,
    Punct(char),
}

fn tokenize(text: &str) -> Vec<(usize, Tok)> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b' ' | b'\t' | b'\r' | b'\n' => i += 1,
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < bytes.len() {
                    if bytes[i..].starts_with(b"/*") {
                        depth += 1;
                        i += 2;
                    } else if bytes[i..].starts_with(b"*/") {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'"' => {
                let (end, s) = quoted(bytes, i + 1, b'"');
                out.push((i, Tok::Str(s)));
                i = end;
            }
            b'\'' => {
                let (end, _) = quoted(bytes, i + 1, b'\'');
                out.push((i, Tok::Other));
                i = end;
            }
            b'r' if matches!(bytes.get(i + 1), Some(b'"') | Some(b'#')) => {
                let hashes = bytes[i + 1..].iter().take_while(|&&b| b == b'#').count();
                let open = i + 1 + hashes;
                if bytes.get(open) == Some(&b'"') {
                    let mut close = "\"".to_owned();
                    close.push_str(&"#".repeat(hashes));
                    let body_start = open + 1;
                    let end = text[body_start..]
                        .find(&close)
                        .map_or(bytes.len(), |p| body_start + p);
                    out.push((i, Tok::Str(text[body_start..end].to_owned())));
                    i = (end + close.len()).min(bytes.len());
                } else {
                    // `r#ident`
                    let start = i;
                    i = open;
                    while i < bytes.len() && is_ident_byte(bytes[i]) {
                        i += 1;
                    }
                    out.push((start, Tok::Ident(text[open..i].to_owned())));
                }
            }
            b'(' | b')' | b'[' | b']' | b'{' | b'}' | b',' | b':' | b'#' | b'!' => {
                out.push((i, Tok::Punct(c as char)));
                i += 1;
            }
            _ if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < bytes.len() && is_ident_byte(bytes[i]) {
                    i += 1;
                }
                out.push((start, Tok::Ident(text[start..i].to_owned())));
            }
            _ => {
                let start = i;
                i += 1;
                while i < bytes.len() && !b" \t\r\n,()[]{}:".contains(&bytes[i]) {
                    i += 1;
                }
                out.push((start, Tok::Other));
            }
        }
    }
    out
}

fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Reads a quoted literal starting after its opening quote; returns the offset
/// after the closing quote and the raw content (escapes left as written).
fn quoted(bytes: &[u8], mut i: usize, quote: u8) -> (usize, String) {
    let start = i;
    while i < bytes.len() && bytes[i] != quote {
        if bytes[i] == b'\\' {
            i += 1;
        }
        i += 1;
    }
    let end = i.min(bytes.len());
    (
        (end + 1).min(bytes.len()),
        String::from_utf8_lossy(&bytes[start..end]).into_owned(),
    )
}

/// How deep values are mapped. `ron` refuses deeper nesting (its recursion
/// limit, 128) with a located error, so nothing below is ever pointed at;
/// mapping it would only recurse, and a file of nested brackets would
/// overflow the stack.
const MAX_DEPTH: usize = 128;

struct Parser<'a> {
    text: &'a str,
    tokens: Vec<(usize, Tok)>,
    pos: usize,
    depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.pos).map(|(_, t)| t)
    }

    fn peek_at(&self, ahead: usize) -> Option<&Tok> {
        self.tokens.get(self.pos + ahead).map(|(_, t)| t)
    }

    fn offset(&self) -> usize {
        self.tokens
            .get(self.pos)
            .map_or(self.text.len(), |(o, _)| *o)
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(&Tok::Punct(c)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn skip_attributes(&mut self) {
        // `#![enable(...)]`
        while self.peek() == Some(&Tok::Punct('#')) {
            while let Some(tok) = self.peek().cloned() {
                self.pos += 1;
                if tok == Tok::Punct(']') {
                    break;
                }
            }
        }
    }

    fn value(&mut self) -> Option<Node> {
        self.skip_attributes();
        let start = self.offset();
        if self.depth >= MAX_DEPTH {
            self.skip_value();
            return Some(atom(start));
        }
        self.depth += 1;
        let node = self.nested(start);
        self.depth -= 1;
        node
    }

    /// Passes over one value without mapping it, bracket by bracket (no
    /// recursion, however deep it goes).
    fn skip_value(&mut self) {
        let mut open = 0usize;
        while let Some(tok) = self.peek() {
            match tok {
                Tok::Punct('(' | '[' | '{') => open += 1,
                Tok::Punct(')' | ']' | '}') if open == 0 => return,
                Tok::Punct(')' | ']' | '}') => open -= 1,
                Tok::Punct(',') if open == 0 => return,
                _ => {}
            }
            self.pos += 1;
        }
    }

    fn nested(&mut self, start: usize) -> Option<Node> {
        let tok = self.peek()?.clone();
        self.pos += 1;
        let node = match tok {
            Tok::Ident(name) => {
                if self.eat('(') {
                    let body = self.parenthesised();
                    Node {
                        start,
                        name: Some(name),
                        body,
                    }
                } else {
                    atom(start)
                }
            }
            Tok::Punct('(') => Node {
                start,
                name: None,
                body: self.parenthesised(),
            },
            Tok::Punct('[') => {
                let mut items = Vec::new();
                while !self.eat(']') && self.peek().is_some() {
                    if self.eat(',') {
                        continue;
                    }
                    items.push(self.value()?);
                }
                Node {
                    start,
                    name: None,
                    body: Body::Items(items),
                }
            }
            Tok::Punct('{') => {
                let mut entries = Vec::new();
                while !self.eat('}') && self.peek().is_some() {
                    if self.eat(',') {
                        continue;
                    }
                    let key = match self.peek() {
                        Some(Tok::Str(s) | Tok::Ident(s)) => s.clone(),
                        _ => String::new(),
                    };
                    self.value()?;
                    self.eat(':');
                    entries.push((key, self.value()?));
                }
                Node {
                    start,
                    name: None,
                    body: Body::Entries(entries),
                }
            }
            _ => atom(start),
        };
        Some(node)
    }

    /// The inside of `( … )`: named fields or positional items.
    fn parenthesised(&mut self) -> Body {
        let named =
            matches!(self.peek(), Some(Tok::Ident(_))) && self.peek_at(1) == Some(&Tok::Punct(':'));
        let mut fields = Vec::new();
        let mut items = Vec::new();
        while !self.eat(')') && self.peek().is_some() {
            if self.eat(',') {
                continue;
            }
            if named {
                let Some(Tok::Ident(name)) = self.peek().cloned() else {
                    self.pos += 1;
                    continue;
                };
                self.pos += 1;
                self.eat(':');
                match self.value() {
                    Some(v) => fields.push((name, v)),
                    None => break,
                }
            } else {
                match self.value() {
                    Some(v) => items.push(v),
                    None => break,
                }
            }
        }
        if named {
            Body::Fields(fields)
        } else {
            Body::Items(items)
        }
    }
}

fn atom(start: usize) -> Node {
    Node {
        start,
        name: None,
        body: Body::Atom,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = r##"// a comment with ( and "
Workflow(
    name: "x", /* nested /* comment */ ) */
    states: [
        State(name: "受理", title: "已受理", transitions: [
            Transition(event: "go", to: r#"done"#),
        ]),
        State(name: "b", title: "完成", outcome: Some("ok")),
    ],
    map: {"甲": 1, "b": [1, 2]},
)
"##;

    fn path(parts: &[Seg]) -> DocPath {
        DocPath(parts.to_vec())
    }

    #[test]
    fn root_name_is_the_struct_name() {
        assert_eq!(SourceMap::new(SRC).root_name(), Some("Workflow"));
    }

    #[test]
    fn columns_count_characters_after_chinese_text() {
        let map = SourceMap::new(SRC);
        let p = DocPath::root().field("states").index(0).field("title");
        // `State(name: "受理", title: ` — the Chinese name is 2 chars, 6 bytes.
        assert_eq!(map.locate(&p), LineCol { line: 5, col: 34 });
    }

    #[test]
    fn raw_strings_comments_and_some_are_handled() {
        let map = SourceMap::new(SRC);
        let to = DocPath::root()
            .field("states")
            .index(0)
            .field("transitions")
            .index(0)
            .field("to");
        assert_eq!(map.locate(&to), LineCol { line: 6, col: 41 });
        let outcome = DocPath::root().field("states").index(1).field("outcome");
        assert_eq!(map.locate(&outcome), LineCol { line: 8, col: 48 });
        let key = path(&[
            Seg::Field("map".into()),
            Seg::Key("b".into()),
            Seg::Index(1),
        ]);
        assert_eq!(map.locate(&key), LineCol { line: 10, col: 28 });
    }

    #[test]
    fn unknown_paths_fall_back_to_the_nearest_ancestor() {
        let map = SourceMap::new(SRC);
        let p = DocPath::root().field("states").index(1).field("deadline");
        assert_eq!(map.locate(&p), LineCol { line: 8, col: 9 });
        assert_eq!(map.locate(&DocPath::root()), LineCol { line: 2, col: 1 });
    }

    #[test]
    fn positions_inside_strings_shift_past_the_quote() {
        let map = SourceMap::new(SRC);
        let p = DocPath::root().field("name");
        assert_eq!(map.locate(&p), LineCol { line: 3, col: 11 });
        assert_eq!(map.locate_in_string(&p, 1, 1), LineCol { line: 3, col: 12 });
    }

    /// Regression: positions inside a string were counted as if it had no
    /// escapes, so a diagnostic after `\"`, `\u{4e2d}` or `\\` was off by
    /// the characters the escape takes beyond one.
    #[test]
    fn positions_inside_strings_count_an_escape_as_the_character_it_stands_for() {
        let text = concat!(
            "(a: \"x == \\\"e\\\" && y\",\n",
            " b: \"'\\u{4e2d}' && y\",\n",
            " c: \"'\\\\' && y\",\n",
            " d: r#\"x == \"r\" && y\"#,\n",
            " e: \"x\\n  && y\",\n",
            " f: \"'\\xe4\\xb8\\xad' && y\")",
        );
        let map = SourceMap::new(text);
        // (field, decoded line and column of `y`, where `y` is written)
        for (field, line, col) in [
            ("a", 1, 13),
            ("b", 1, 8),
            ("c", 1, 8),
            ("d", 1, 13),
            ("e", 2, 6),
            ("f", 1, 8),
        ] {
            let at = map.locate_in_string(&DocPath::root().field(field), line, col);
            let written = text
                .lines()
                .nth(at.line - 1)
                .unwrap()
                .chars()
                .nth(at.col - 1);
            assert_eq!(written, Some('y'), "{field}: {at}");
        }
        // Past the end: the closing quote.
        let at = map.locate_in_string(&DocPath::root().field("c"), 1, 99);
        assert_eq!(at, LineCol { line: 3, col: 15 });
    }

    #[test]
    fn nesting_deeper_than_ron_reads_is_passed_over_not_recursed_into() {
        for text in [
            format!(
                "Workflow(name: \"x\", deep: {}1{}, after: 2)",
                "[".repeat(200_000),
                "]".repeat(200_000)
            ),
            format!("Workflow(name: \"x\", deep: {}", "[(".repeat(200_000)),
        ] {
            let map = SourceMap::new(&text);
            assert_eq!(map.root_name(), Some("Workflow"));
            assert_eq!(map.locate(&path(&[Seg::Field("name".into())])).col, 16);
        }
        let text = format!(
            "Workflow(deep: {}1{}, after: 2)",
            "[".repeat(300),
            "]".repeat(300)
        );
        let after = SourceMap::new(&text).locate(&path(&[Seg::Field("after".into())]));
        assert_eq!(after.col, text.find("2)").unwrap() + 1);
    }

    #[test]
    fn paths_display_like_field_accesses() {
        let p = DocPath::root().field("states").index(2).field("to");
        assert_eq!(p.to_string(), "states[2].to");
    }
}

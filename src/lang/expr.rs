//! CEL guards and effects: compiled once when a workflow loads, and checked
//! statically for unknown names and mismatched types.
//!
//! `cel` parses and evaluates; it has no type checker, so this module infers a
//! type for each node from the names a workflow declares (`vars`, `payload`,
//! `catalogues`, …). Where a type cannot be known it is `Dyn` and nothing is
//! reported: the checker never rejects an expression that could be right.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, LazyLock};

use cel::Program;
use cel::common::ast::{CallExpr, EntryExpr, Expr, IdedExpr, LiteralValue, operators};

use super::diag::hint_for;
use super::model::Type;

/// The static type of a CEL value.
#[derive(Debug, Clone, PartialEq)]
pub enum Ty {
    Bool,
    Int,
    Uint,
    Double,
    String,
    Bytes,
    Null,
    Timestamp,
    Duration,
    List(Box<Ty>),
    Map(Box<Ty>),
    /// A map whose keys are known names (case variables, payload fields, …).
    Record(Arc<BTreeMap<String, Ty>>),
    /// A string restricted to declared values.
    Enum(Arc<[String]>),
    Dyn,
}

impl Ty {
    pub fn record(fields: impl IntoIterator<Item = (String, Ty)>) -> Ty {
        Ty::Record(Arc::new(fields.into_iter().collect()))
    }

    /// The CEL type a declared variable or field type is seen as.
    pub fn of(ty: &Type) -> Ty {
        match ty {
            Type::Enum(values) => Ty::Enum(values.iter().cloned().collect()),
            Type::String | Type::Agency | Type::Date => Ty::String,
            Type::Integer => Ty::Int,
            Type::Decimal => Ty::Double,
            Type::Boolean => Ty::Bool,
            Type::Time => Ty::Timestamp,
            Type::List(inner) => Ty::List(Box::new(Ty::of(inner))),
        }
    }

    /// The type with its indefinite article, for messages: "an int", "a string".
    fn article(&self) -> String {
        let name = self.to_string();
        let an = matches!(name.chars().next(), Some('a' | 'e' | 'i' | 'o' | 'u'));
        format!("{} {name}", if an { "an" } else { "a" })
    }

    /// The type with enumerations seen as plain strings.
    fn plain(&self) -> Ty {
        match self {
            Ty::Enum(_) => Ty::String,
            other => other.clone(),
        }
    }

    fn is_numeric(&self) -> bool {
        matches!(self, Ty::Int | Ty::Uint | Ty::Double)
    }

    /// Whether a value of type `other` may stand where `self` is expected.
    pub fn accepts(&self, other: &Ty) -> bool {
        match (self, other) {
            (Ty::Dyn, _) | (_, Ty::Dyn) | (_, Ty::Null) => true,
            (Ty::Double, Ty::Int | Ty::Uint) | (Ty::Int, Ty::Uint) => true,
            (Ty::List(a), Ty::List(b)) | (Ty::Map(a), Ty::Map(b)) => a.accepts(b),
            (Ty::Map(_), Ty::Record(_)) | (Ty::Record(_), Ty::Map(_)) => true,
            (Ty::Record(_), Ty::Record(_)) => true,
            (Ty::Enum(_) | Ty::String, Ty::Enum(_) | Ty::String) => true,
            (a, b) => a == b,
        }
    }
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ty::Bool => write!(f, "bool"),
            Ty::Int => write!(f, "int"),
            Ty::Uint => write!(f, "uint"),
            Ty::Double => write!(f, "double"),
            Ty::String | Ty::Enum(_) => write!(f, "string"),
            Ty::Bytes => write!(f, "bytes"),
            Ty::Null => write!(f, "null"),
            Ty::Timestamp => write!(f, "timestamp"),
            Ty::Duration => write!(f, "duration"),
            Ty::List(t) => write!(f, "list({t})"),
            Ty::Map(t) => write!(f, "map(string, {t})"),
            Ty::Record(_) => write!(f, "map"),
            Ty::Dyn => write!(f, "dyn"),
        }
    }
}

/// The names an expression may use, with their types.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    names: BTreeMap<String, Ty>,
}

impl Scope {
    pub fn with(mut self, name: &str, ty: Ty) -> Self {
        self.names.insert(name.to_owned(), ty);
        self
    }

    fn get(&self, name: &str) -> Option<&Ty> {
        self.names.get(name)
    }
}

/// A problem inside an expression, at a 1-based line and column of its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExprIssue {
    pub code: &'static str,
    pub message: String,
    pub hint: Option<String>,
    pub line: usize,
    pub col: usize,
}

/// A compiled expression with its inferred type.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub program: Arc<Program>,
    pub ty: Ty,
    /// The names it reads: `(root, Some(field))` for `root.field`, `(root,
    /// None)` where the whole of `root` is used. The engine converts only
    /// what expressions read.
    pub uses: BTreeSet<(String, Option<String>)>,
    /// The `root.field`s it reads that it never tests with `has(root.field)`:
    /// a field that may be absent (an optional payload field) fails such a
    /// read whenever it is left out.
    pub untested: BTreeSet<(String, String)>,
    /// The `root.field`s it tests with `has(root.field)`.
    pub tested: BTreeSet<(String, String)>,
}

/// The longest expression accepted, in characters. The parser, the checker
/// and the interpreter each recurse once per level of an expression, and a
/// chain (`!!!…x`, `a.b.c…`, `x || y || …`) nests a level every character
/// or few: unbounded, one long enough overflowed the thread's stack and
/// aborted the process. The longest shipped expression is 324 characters.
pub const MAX_EXPRESSION_CHARS: usize = 2000;

/// The stack of every thread that compiles or evaluates expressions (the
/// engine's writer, the server's runtime, the audit's workers): enough for
/// an expression of [`MAX_EXPRESSION_CHARS`] nested at every character,
/// measured at under 2 KiB a level in a release build, with room for a
/// debug build's larger frames. Reserved, not used, until needed.
pub const STACK_BYTES: usize = 64 << 20;

/// Compiles `source` and checks it against `scope`.
/// CEL's reserved words: a name that is one cannot follow a `.`.
const RESERVED: [&str; 21] = [
    "as",
    "break",
    "const",
    "continue",
    "else",
    "false",
    "for",
    "function",
    "if",
    "import",
    "in",
    "let",
    "loop",
    "namespace",
    "null",
    "package",
    "return",
    "true",
    "var",
    "void",
    "while",
];

/// The first `object.word` in `source` whose word is reserved in CEL
/// (`vars.in`), which does not parse though a variable may be so named.
fn reserved_selection(source: &str) -> Option<(&str, &str)> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    source.match_indices('.').find_map(|(dot, _)| {
        let before = &source[..dot];
        let object = &before[before.trim_end_matches(is_ident).len()..];
        let after = &source[dot + 1..];
        let word = &after[..after.len() - after.trim_start_matches(is_ident).len()];
        (!object.is_empty() && RESERVED.contains(&word)).then_some((object, word))
    })
}

pub fn compile(source: &str, scope: &Scope) -> Result<Compiled, Vec<ExprIssue>> {
    let length = source.chars().count();
    if length > MAX_EXPRESSION_CHARS {
        return Err(vec![ExprIssue {
            code: "expr-too-long",
            message: format!(
                "the expression is {length} characters long, over the limit of {MAX_EXPRESSION_CHARS}"
            ),
            hint: Some(
                "split it over several guards or effects, or keep a long list in a catalogue"
                    .to_owned(),
            ),
            line: 1,
            col: 1,
        }]);
    }
    let program = Program::compile(source).map_err(|errors| {
        // The first error is the cause; ANTLR's later ones are its echoes.
        errors
            .errors
            .iter()
            .take(1)
            .map(|e| ExprIssue {
                code: "expr-syntax",
                message: format!("expression does not compile: {}", syntax_message(&e.msg)),
                hint: reserved_selection(source).map(|(object, word)| {
                    format!("`{word}` is a reserved word in CEL: write `{object}['{word}']`")
                }),
                line: e.pos.0.max(1) as usize,
                col: e.pos.1.max(1) as usize,
            })
            .collect::<Vec<_>>()
    })?;
    let mut checker = Checker {
        program: &program,
        issues: Vec::new(),
        uses: BTreeSet::new(),
        read: BTreeSet::new(),
        tested: BTreeSet::new(),
    };
    let ty = checker.infer(program.expression(), scope);
    let Checker {
        issues,
        uses,
        read,
        tested,
        ..
    } = checker;
    if issues.is_empty() {
        Ok(Compiled {
            program: Arc::new(program),
            ty,
            uses,
            untested: read.difference(&tested).cloned().collect(),
            tested,
        })
    } else {
        Err(issues)
    }
}

/// ANTLR's message without its long list of expected tokens.
fn syntax_message(msg: &str) -> String {
    const TOO_DEEP: &str = "Recursion limit of ";
    let msg = msg.strip_prefix("Syntax error: ").unwrap_or(msg);
    if msg.starts_with("mismatched input '<EOF>'") {
        return "it ends too early".to_owned();
    }
    // The parser's own error, quoted in its debugging form.
    if let Some(at) = msg.find(TOO_DEEP) {
        let limit: String = msg[at + TOO_DEEP.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        return format!("it nests more than {limit} levels deep");
    }
    match msg.find(" expecting {") {
        Some(cut) => msg[..cut].to_owned(),
        None => msg.to_owned(),
    }
}

/// 1-based line and character column of a byte offset in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, col)
}

struct Checker<'p> {
    program: &'p Program,
    issues: Vec<ExprIssue>,
    uses: BTreeSet<(String, Option<String>)>,
    /// `root.field`s read, and those tested with `has(root.field)`.
    read: BTreeSet<(String, String)>,
    tested: BTreeSet<(String, String)>,
}

impl Checker<'_> {
    fn report(
        &mut self,
        node: &IdedExpr,
        code: &'static str,
        message: String,
        hint: Option<String>,
    ) {
        let mut start = self
            .program
            .source_info()
            .offset_for(node.id)
            .map_or(0, |(start, _)| start as usize);
        // A selection is recorded at its dot; point at the field name instead.
        let source = &self.program.source_info().source;
        if matches!(node.expr, Expr::Select(_)) {
            start += 1;
        }
        // A call is recorded at its parenthesis; point at the function's name.
        if let Expr::Call(call) = &node.expr {
            let name = call.func_name.as_str();
            if let Some(name_start) = start.checked_sub(name.len())
                && source.get(name_start..start) == Some(name)
            {
                start = name_start;
            }
        }
        let (line, col) = line_col(source, start);
        self.issues.push(ExprIssue {
            code,
            message,
            hint,
            line,
            col,
        });
    }

    fn mismatch(&mut self, node: &IdedExpr, message: String) -> Ty {
        self.report(node, "type-mismatch", message, None);
        Ty::Dyn
    }

    fn infer(&mut self, node: &IdedExpr, scope: &Scope) -> Ty {
        match &node.expr {
            Expr::Literal(lit) => match lit {
                LiteralValue::Boolean(_) => Ty::Bool,
                LiteralValue::Bytes(_) => Ty::Bytes,
                LiteralValue::Double(_) => Ty::Double,
                LiteralValue::Int(_) => Ty::Int,
                LiteralValue::Null => Ty::Null,
                LiteralValue::String(_) => Ty::String,
                LiteralValue::UInt(_) => Ty::Uint,
            },
            Expr::Ident(name) => match scope.get(name) {
                Some(ty) => {
                    self.uses.insert((name.clone(), None));
                    ty.clone()
                }
                // A type name, unless a name in scope shadows it, as at run time.
                None if TYPE_NAMES.contains(&name.as_str()) => Ty::Dyn,
                None => {
                    let hint = match TYPE_NAMES_OF_FUNCTIONS.iter().find(|(f, _)| f == name) {
                        Some((_, type_name)) => Some(format!(
                            "`{name}` is a function here, not a type: the type is named `{type_name}`"
                        )),
                        None => hint_for(name, "names", scope.names.keys().map(String::as_str)),
                    };
                    self.report(node, "unknown-name", format!("unknown name `{name}`"), hint);
                    Ty::Dyn
                }
            },
            // `google.protobuf.Timestamp`, when no name in scope starts it.
            Expr::Select(select)
                if !select.test
                    && qualified_name(node).is_some_and(|name| {
                        TYPE_NAMES.contains(&name.as_str())
                            && name
                                .split('.')
                                .next()
                                .is_some_and(|root| scope.get(root).is_none())
                    }) =>
            {
                Ty::Dyn
            }
            Expr::Select(select) => {
                // `root.field` reads one field of a top-level name, not all of it.
                let operand = match &select.operand.expr {
                    Expr::Ident(root) if scope.get(root).is_some() => {
                        self.uses.insert((root.clone(), Some(select.field.clone())));
                        let field = (root.clone(), select.field.clone());
                        if select.test {
                            self.tested.insert(field);
                        } else {
                            self.read.insert(field);
                        }
                        scope.get(root).cloned().unwrap_or(Ty::Dyn)
                    }
                    _ => self.infer(&select.operand, scope),
                };
                let field_ty = self.field(node, &select.operand, &operand, &select.field);
                if select.test { Ty::Bool } else { field_ty }
            }
            Expr::Call(call) => self.call(node, call, scope),
            Expr::Comprehension(c) => {
                let range = self.infer(&c.iter_range, scope);
                let (first, second) = match &range {
                    Ty::List(elem) => (Ty::Int, (**elem).clone()),
                    Ty::Map(value) => (Ty::String, (**value).clone()),
                    Ty::Record(_) => (Ty::String, Ty::Dyn),
                    _ => (Ty::Dyn, Ty::Dyn),
                };
                let iter_ty = match (&range, &c.iter_var2) {
                    (_, Some(_)) => first.clone(),
                    (Ty::List(_), None) => second.clone(),
                    _ => first.clone(),
                };
                let mut inner = scope.clone().with(&c.iter_var, iter_ty);
                if let Some(v2) = &c.iter_var2 {
                    inner = inner.with(v2, second);
                }
                let accu = self.infer(&c.accu_init, &inner);
                let inner = inner.with(&c.accu_var, accu);
                self.infer(&c.loop_cond, &inner);
                self.infer(&c.loop_step, &inner);
                self.infer(&c.result, &inner)
            }
            Expr::List(list) => {
                let tys: Vec<Ty> = list.elements.iter().map(|e| self.infer(e, scope)).collect();
                Ty::List(Box::new(unify(&tys)))
            }
            Expr::Map(map) => {
                let mut values = Vec::new();
                for entry in &map.entries {
                    match &entry.expr {
                        EntryExpr::MapEntry(e) => {
                            self.infer(&e.key, scope);
                            values.push(self.infer(&e.value, scope));
                        }
                        EntryExpr::StructField(f) => values.push(self.infer(&f.value, scope)),
                    }
                }
                Ty::Map(Box::new(unify(&values)))
            }
            Expr::Struct(_) | Expr::Unspecified => Ty::Dyn,
        }
    }

    /// The type of `operand.field`.
    fn field(&mut self, node: &IdedExpr, operand_node: &IdedExpr, operand: &Ty, field: &str) -> Ty {
        match operand {
            Ty::Record(fields) => match fields.get(field) {
                Some(ty) => ty.clone(),
                None => {
                    let owner = describe(operand_node);
                    let hint = hint_for(field, "names", fields.keys().map(String::as_str));
                    self.report(
                        node,
                        "unknown-name",
                        format!("`{owner}` has no `{field}`"),
                        hint,
                    );
                    Ty::Dyn
                }
            },
            Ty::Map(value) => (**value).clone(),
            Ty::Dyn | Ty::Null => Ty::Dyn,
            other => self.mismatch(node, format!("cannot read field `{field}` of a {other}")),
        }
    }

    fn call(&mut self, node: &IdedExpr, call: &CallExpr, scope: &Scope) -> Ty {
        if let Some(target) = &call.target {
            self.infer(target, scope);
        }
        let args: Vec<Ty> = call.args.iter().map(|a| self.infer(a, scope)).collect();
        let name = call.func_name.as_str();
        match name {
            operators::LOGICAL_AND | operators::LOGICAL_OR | operators::LOGICAL_NOT => {
                for (arg, ty) in call.args.iter().zip(&args) {
                    if !Ty::Bool.accepts(ty) {
                        self.mismatch(
                            arg,
                            format!("`{}` needs bool operands, found {ty}", symbol(name)),
                        );
                    }
                }
                Ty::Bool
            }
            operators::NOT_STRICTLY_FALSE | operators::IN => Ty::Bool,
            operators::EQUALS | operators::NOT_EQUALS => {
                if let [a, b] = args.as_slice() {
                    if !comparable(a, b) {
                        self.mismatch(
                            node,
                            format!(
                                "`{}` compares {} with {}",
                                symbol(name),
                                a.article(),
                                b.article()
                            ),
                        );
                    }
                    self.check_enum_literal(a, &call.args[1]);
                    self.check_enum_literal(b, &call.args[0]);
                }
                Ty::Bool
            }
            operators::LESS
            | operators::LESS_EQUALS
            | operators::GREATER
            | operators::GREATER_EQUALS => {
                if let [a, b] = args.as_slice() {
                    let (a, b) = (&a.plain(), &b.plain());
                    let ordered = matches!(a, Ty::Dyn | Ty::Null)
                        || matches!(b, Ty::Dyn | Ty::Null)
                        || (a.is_numeric() && b.is_numeric())
                        || (a == b
                            && matches!(
                                a,
                                Ty::String | Ty::Timestamp | Ty::Duration | Ty::Bool | Ty::Bytes
                            ));
                    if !ordered {
                        self.mismatch(
                            node,
                            format!(
                                "`{}` cannot order {} and {}",
                                symbol(name),
                                a.article(),
                                b.article()
                            ),
                        );
                    }
                }
                Ty::Bool
            }
            operators::ADD
            | operators::SUBSTRACT
            | operators::MULTIPLY
            | operators::DIVIDE
            | operators::MODULO => match args.as_slice() {
                [a, b] => self.arithmetic(node, name, a, b),
                _ => Ty::Dyn,
            },
            operators::NEGATE => match args.first() {
                Some(t @ (Ty::Int | Ty::Double | Ty::Duration | Ty::Dyn)) => t.clone(),
                Some(other) => self.mismatch(node, format!("cannot negate a {other}")),
                None => Ty::Dyn,
            },
            operators::CONDITIONAL => {
                if let [cond, yes, no] = args.as_slice() {
                    if !Ty::Bool.accepts(cond) {
                        self.mismatch(
                            &call.args[0],
                            format!("a condition must be bool, found {cond}"),
                        );
                    }
                    unify(&[yes.clone(), no.clone()])
                } else {
                    Ty::Dyn
                }
            }
            operators::INDEX | operators::OPT_INDEX => match (args.first(), args.get(1)) {
                (Some(Ty::List(elem)), Some(_)) => (**elem).clone(),
                (Some(Ty::Map(value)), Some(_)) => (**value).clone(),
                (Some(record @ Ty::Record(_)), Some(_)) => match &call.args[1].expr {
                    Expr::Literal(LiteralValue::String(key)) => {
                        self.field(node, &call.args[0], record, key.inner())
                    }
                    _ => Ty::Dyn,
                },
                (Some(Ty::Dyn | Ty::Null), _) | (None, _) | (_, None) => Ty::Dyn,
                (Some(other), _) => self.mismatch(node, format!("cannot index a {other}")),
            },
            _ => self.function(node, call, name),
        }
    }

    /// A call of a named function: one the runtime provides, called in the
    /// form it provides (`int(x)`, `s.startsWith(p)`), has its result type;
    /// anything else would fail every evaluation with "Undeclared reference".
    fn function(&mut self, node: &IdedExpr, call: &CallExpr, name: &str) -> Ty {
        let method = call.target.is_some();
        if let Some(function) = FUNCTIONS.iter().find(|f| f.name == name) {
            let fits = match function.form {
                Form::Either => true,
                Form::Global => !method,
                Form::Method => method,
            };
            if fits {
                self.check_constant_conversion(node, call, name);
                return function.returns.clone();
            }
            let (message, hint) = if method {
                (
                    format!("`{name}` is a function, not a method"),
                    format!("write `{name}(value)`"),
                )
            } else {
                (
                    format!("`{name}` is a method, not a function"),
                    format!("write `value.{name}(…)`"),
                )
            };
            self.report(node, "unknown-name", message, Some(hint));
            return Ty::Dyn;
        }
        let message = match MACROS.iter().find(|(macro_name, _)| *macro_name == name) {
            // The parser expands a macro only when it is written in its one form.
            Some((_, form)) => format!("`{name}` must be written `{form}`"),
            None => format!("unknown function `{name}`"),
        };
        let hint = match EXTENSIONS.iter().find(|(_, names)| names.contains(&name)) {
            Some((extension, _)) => Some(format!(
                "govflow has CEL's standard functions only, not its {extension} extension"
            )),
            None => super::diag::did_you_mean(
                name,
                FUNCTIONS
                    .iter()
                    .map(|f| f.name)
                    .chain(MACROS.iter().map(|m| m.0)),
            ),
        };
        self.report(node, "unknown-name", message, hint);
        Ty::Dyn
    }

    /// `duration('…')` and `timestamp('…')` of a literal give the same
    /// result at every evaluation: one the runtime cannot convert would fail
    /// every time (`duration('1d')`: durations count `h`, `m`, `s`, `ms`, …).
    fn check_constant_conversion(&mut self, node: &IdedExpr, call: &CallExpr, name: &str) {
        let (true, None, [argument]) = (
            matches!(name, "duration" | "timestamp"),
            &call.target,
            call.args.as_slice(),
        ) else {
            return;
        };
        let Expr::Literal(LiteralValue::String(text)) = &argument.expr else {
            return;
        };
        let Ok(quoted) = serde_json::to_string(text.inner()) else {
            return;
        };
        let Ok(program) = Program::compile(&format!("{name}({quoted})")) else {
            return;
        };
        let context = cel::Context::with_env(environment());
        // Third-party code: a panic inside it says nothing about the literal.
        let run =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| program.execute(&context)));
        if let Ok(Err(e)) = run {
            let example = if name == "duration" {
                "a duration counts h, m, s, ms, us or ns: `duration('24h')`, not days"
            } else {
                "a timestamp is RFC 3339: `timestamp('2020-06-01T09:00:00+08:00')`"
            };
            self.report(
                node,
                "bad-constant",
                format!(
                    "`{name}('{}')` fails at every evaluation: {e}",
                    text.inner()
                ),
                Some(example.to_owned()),
            );
        }
    }

    /// A string literal compared with an enumeration must be one of its values.
    fn check_enum_literal(&mut self, ty: &Ty, other: &IdedExpr) {
        if let (Ty::Enum(values), Expr::Literal(LiteralValue::String(lit))) = (ty, &other.expr)
            && !values.iter().any(|v| v == lit.inner())
        {
            let hint = super::diag::did_you_mean(lit.inner(), values.iter().map(String::as_str));
            self.report(
                other,
                "type-mismatch",
                format!("`{}` is not one of {}", lit.inner(), values.join(", ")),
                hint,
            );
        }
    }

    fn arithmetic(&mut self, node: &IdedExpr, op: &str, a: &Ty, b: &Ty) -> Ty {
        use Ty::*;
        let (a, b) = (&a.plain(), &b.plain());
        match (op, a, b) {
            (_, Dyn | Null, _) | (_, _, Dyn | Null) => Dyn,
            (_, Int, Int) => Int,
            (_, Uint, Uint) => Uint,
            (_, Double, Double) if op != operators::MODULO => Double,
            (operators::ADD, String, String) => String,
            (operators::ADD, Bytes, Bytes) => Bytes,
            (operators::ADD, List(x), List(y)) => {
                List(Box::new(unify(&[(**x).clone(), (**y).clone()])))
            }
            (operators::ADD, Timestamp, Duration) | (operators::ADD, Duration, Timestamp) => {
                Timestamp
            }
            (operators::ADD | operators::SUBSTRACT, Duration, Duration) => Duration,
            (operators::SUBSTRACT, Timestamp, Duration) => Timestamp,
            (operators::SUBSTRACT, Timestamp, Timestamp) => Duration,
            _ => {
                let hint = (a.is_numeric() && b.is_numeric()).then(|| {
                    "CEL does not mix int and double: convert with double(…) or int(…)".to_owned()
                });
                self.report(
                    node,
                    "type-mismatch",
                    format!(
                        "`{}` cannot combine {} and {}",
                        symbol(op),
                        a.article(),
                        b.article()
                    ),
                    hint,
                );
                Dyn
            }
        }
    }
}

/// How a function is called.
enum Form {
    /// `int(x)`
    Global,
    /// `s.startsWith(p)`
    Method,
    /// `size(x)` or `x.size()`
    Either,
}

/// A function of the runtime's environment ([`environment`]).
struct Function {
    name: &'static str,
    form: Form,
    returns: Ty,
}

const fn function(name: &'static str, form: Form, returns: Ty) -> Function {
    Function {
        name,
        form,
        returns,
    }
}

/// Every function `cel::Env::stdlib()` provides (cel 0.15), in the forms it
/// provides them. Nothing else may be accepted: the test
/// `every_function_the_checker_accepts_runs` evaluates each of them through
/// [`environment`], so this list cannot name one the runtime lacks.
const FUNCTIONS: &[Function] = &[
    function("size", Form::Either, Ty::Int),
    function("matches", Form::Either, Ty::Bool),
    function("contains", Form::Method, Ty::Bool),
    function("startsWith", Form::Method, Ty::Bool),
    function("endsWith", Form::Method, Ty::Bool),
    function("int", Form::Global, Ty::Int),
    function("uint", Form::Global, Ty::Uint),
    function("double", Form::Global, Ty::Double),
    function("string", Form::Global, Ty::String),
    function("bool", Form::Global, Ty::Bool),
    function("bytes", Form::Global, Ty::Bytes),
    function("timestamp", Form::Global, Ty::Timestamp),
    function("duration", Form::Global, Ty::Duration),
    function("type", Form::Global, Ty::Dyn),
    function("dyn", Form::Global, Ty::Dyn),
    function("getFullYear", Form::Method, Ty::Int),
    function("getMonth", Form::Method, Ty::Int),
    function("getDayOfMonth", Form::Method, Ty::Int),
    function("getDate", Form::Method, Ty::Int),
    function("getDayOfWeek", Form::Method, Ty::Int),
    function("getDayOfYear", Form::Method, Ty::Int),
    function("getHours", Form::Method, Ty::Int),
    function("getMinutes", Form::Method, Ty::Int),
    function("getSeconds", Form::Method, Ty::Int),
    function("getMilliseconds", Form::Method, Ty::Int),
];

/// The names of types the runtime's environment resolves (cel 0.15), for
/// `type(x) == int`; a type value has no static type here (`Dyn`). The test
/// `every_type_name_the_checker_accepts_runs` compares each with the type of
/// a value through [`environment`], so this list cannot name one it lacks.
const TYPE_NAMES: &[&str] = &[
    "bool",
    "bytes",
    "double",
    "int",
    "uint",
    "string",
    "list",
    "map",
    "null_type",
    "type",
    "optional_type",
    "google.protobuf.Timestamp",
    "google.protobuf.Duration",
];

/// Conversion functions whose name is not also their type's name, as it is
/// for `int`: the type to compare with instead.
const TYPE_NAMES_OF_FUNCTIONS: &[(&str, &str)] = &[
    ("timestamp", "google.protobuf.Timestamp"),
    ("duration", "google.protobuf.Duration"),
];

/// The dotted name a chain of selections spells (`google.protobuf.Timestamp`).
fn qualified_name(node: &IdedExpr) -> Option<String> {
    match &node.expr {
        Expr::Ident(name) => Some(name.clone()),
        Expr::Select(s) if !s.test => Some(format!("{}.{}", qualified_name(&s.operand)?, s.field)),
        _ => None,
    }
}

/// The standard macros, each in the one form the parser expands; written
/// any other way it is left a call that no function answers.
const MACROS: &[(&str, &str)] = &[
    ("has", "has(value.field)"),
    ("all", "list.all(x, condition)"),
    ("exists", "list.exists(x, condition)"),
    ("exists_one", "list.exists_one(x, condition)"),
    ("map", "list.map(x, expression)"),
    ("filter", "list.filter(x, condition)"),
];

/// Functions of CEL's extension libraries, which CEL's documentation lists
/// but govflow's runtime does not register, by extension (with `max` and
/// `min`, which authors guess for the math extension's `greatest` and
/// `least`): a hint says so rather than suggesting a look-alike.
const EXTENSIONS: &[(&str, &[&str])] = &[
    (
        "strings",
        &[
            "charAt",
            "format",
            "indexOf",
            "join",
            "lastIndexOf",
            "lowerAscii",
            "quote",
            "replace",
            "split",
            "substring",
            "trim",
            "upperAscii",
        ],
    ),
    (
        "lists",
        &[
            "distinct", "flatten", "range", "reverse", "slice", "sort", "sortBy", "isSorted",
        ],
    ),
    (
        "math",
        &[
            "abs", "ceil", "floor", "greatest", "least", "max", "min", "round", "sign", "sqrt",
            "trunc",
        ],
    ),
];

/// The environment every expression runs in: CEL's standard library, built
/// once (building it registers every standard function). The checker's
/// [`FUNCTIONS`] are what it provides.
pub fn environment() -> Arc<cel::Env> {
    static STDLIB: LazyLock<Arc<cel::Env>> = LazyLock::new(|| Arc::new(cel::Env::stdlib()));
    Arc::clone(&STDLIB)
}

/// Whether `==` may compare these types.
fn comparable(a: &Ty, b: &Ty) -> bool {
    a.accepts(b) || b.accepts(a) || (a.is_numeric() && b.is_numeric())
}

/// The common type of several, or `Dyn` when they differ.
fn unify(tys: &[Ty]) -> Ty {
    let mut known = tys.iter().filter(|t| !matches!(t, Ty::Null | Ty::Dyn));
    match known.next() {
        None => Ty::Dyn,
        Some(first) if known.all(|t| t == first) => first.clone(),
        Some(_) => Ty::Dyn,
    }
}

fn symbol(op: &str) -> &str {
    op.trim_matches('_').trim_start_matches('@')
}

/// A short rendering of a select chain for messages: `vars`, `payload`, `catalogues.permits`.
fn describe(node: &IdedExpr) -> String {
    match &node.expr {
        Expr::Ident(name) => name.clone(),
        Expr::Select(s) => format!("{}.{}", describe(&s.operand), s.field),
        Expr::Call(c) if c.func_name == operators::INDEX && !c.args.is_empty() => {
            format!("{}[…]", describe(&c.args[0]))
        }
        _ => "value".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope() -> Scope {
        Scope::default()
            .with(
                "vars",
                Ty::record([
                    ("level".to_owned(), Ty::String),
                    ("count".to_owned(), Ty::Int),
                    ("amount".to_owned(), Ty::Double),
                    (
                        "phase".to_owned(),
                        Ty::of(&Type::Enum(vec!["open".into(), "closed".into()])),
                    ),
                ]),
            )
            .with("payload", Ty::record([("ok".to_owned(), Ty::Bool)]))
            .with("now", Ty::Timestamp)
    }

    fn issues(src: &str) -> Vec<(String, &'static str, usize)> {
        match compile(src, &scope()) {
            Ok(_) => Vec::new(),
            Err(issues) => issues
                .into_iter()
                .map(|i| (i.message, i.code, i.col))
                .collect(),
        }
    }

    #[test]
    fn well_typed_expressions_compile() {
        for src in [
            "vars.level == 'city' && payload.ok",
            "vars.count + 1 > 3",
            "vars.amount > 10",
            "[1, 2].all(x, x > 0)",
            "has(vars.level)",
            "now + duration('1h') > now",
            "vars.level in ['county', 'city']",
        ] {
            assert_eq!(issues(src), vec![], "{src}");
        }
        assert_eq!(
            compile("vars.count * 2", &scope()).map(|c| c.ty).ok(),
            Some(Ty::Int)
        );
    }

    #[test]
    fn unknown_names_are_located_with_a_hint() {
        let Err(found) = compile("vars.levl == 'city'", &scope()) else {
            panic!("expected an issue")
        };
        assert_eq!(found[0].code, "unknown-name");
        assert_eq!(found[0].message, "`vars` has no `levl`");
        assert_eq!(found[0].hint.as_deref(), Some("did you mean `level`?"));
        assert_eq!((found[0].line, found[0].col), (1, 6));
        assert_eq!(issues("varz.level")[0].0, "unknown name `varz`");
        assert_eq!(
            issues("frobnicate(1)")[0].0,
            "unknown function `frobnicate`"
        );
    }

    #[test]
    fn mismatched_types_are_reported() {
        assert_eq!(issues("vars.level > 3")[0].1, "type-mismatch");
        assert_eq!(issues("vars.count + vars.amount")[0].1, "type-mismatch");
        assert_eq!(issues("vars.level && true")[0].1, "type-mismatch");
        assert_eq!(issues("vars.count == 'x'")[0].1, "type-mismatch");
        assert_eq!(
            issues("vars.phase == 'clsoed'")[0].0,
            "`clsoed` is not one of open, closed"
        );
        assert_eq!(issues("'opne' != vars.phase")[0].2, 1);
        assert_eq!(issues("vars.phase == 'closed' && vars.phase > 'a'"), vec![]);
    }

    #[test]
    fn conversions_of_literals_that_always_fail_are_reported() {
        let found = issues("duration('25h') > duration('1d')");
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].1, "bad-constant");
        assert!(
            found[0]
                .0
                .starts_with("`duration('1d')` fails at every evaluation"),
            "{found:?}"
        );
        assert_eq!(issues("timestamp('2020-13-01')")[0].1, "bad-constant");
        assert!(
            issues(
                "timestamp('2020-06-01T09:00:00+08:00') < now && duration('90m') > duration('1h')"
            )
            .is_empty()
        );
    }

    #[test]
    fn a_reserved_word_after_a_dot_is_named_with_how_to_write_it() {
        let Err(found) = compile("vars.in > 0", &Scope::default()) else {
            panic!("`vars.in` compiled");
        };
        assert_eq!(found[0].code, "expr-syntax");
        assert_eq!(
            found[0].hint.as_deref(),
            Some("`in` is a reserved word in CEL: write `vars['in']`")
        );
        assert_eq!(reserved_selection("payload.inside + vars.x"), None);
        assert_eq!(reserved_selection("a in b"), None);
    }

    #[test]
    fn syntax_errors_are_located() {
        let found = issues("vars.count +");
        assert_eq!(found[0].1, "expr-syntax");
        assert_eq!(found[0].2, 13);
        assert_eq!(found[0].0, "expression does not compile: it ends too early");
    }

    /// The value's type as the checker names it, for the types functions return.
    fn runtime_ty(value: &cel::Value) -> Option<Ty> {
        Some(match value {
            cel::Value::Int(_) => Ty::Int,
            cel::Value::UInt(_) => Ty::Uint,
            cel::Value::Float(_) => Ty::Double,
            cel::Value::String(_) => Ty::String,
            cel::Value::Bool(_) => Ty::Bool,
            cel::Value::Bytes(_) => Ty::Bytes,
            cel::Value::Timestamp(_) => Ty::Timestamp,
            cel::Value::Duration(_) => Ty::Duration,
            _ => return None,
        })
    }

    /// Evaluates `src` as the engine does: checked, then run in [`environment`].
    fn run(src: &str) -> Result<(Ty, cel::Value), String> {
        let compiled = compile(src, &scope()).map_err(|i| format!("checker: {i:?}"))?;
        let context = cel::Context::with_env(environment());
        let value = compiled
            .program
            .execute(&context)
            .map_err(|e| format!("runtime: {e}"))?;
        Ok((compiled.ty, value))
    }

    /// Regression: the checker accepted `lowerAscii`, `flatten`, `max`, … which
    /// the runtime does not have, so such a guard passed validation and failed
    /// every evaluation with "Undeclared reference". Every function the checker
    /// accepts, in each form it accepts, is run here through the runtime's
    /// environment, and must give the type the checker says.
    #[test]
    fn every_function_the_checker_accepts_runs() {
        let at = "timestamp('2020-01-01T00:00:00Z')";
        let examples: BTreeMap<&str, Vec<String>> = [
            ("size", vec!["size('ab')".into(), "[1].size()".into()]),
            (
                "matches",
                vec!["matches('ab', 'a')".into(), "'ab'.matches('a')".into()],
            ),
            ("contains", vec!["'ab'.contains('b')".into()]),
            ("startsWith", vec!["'ab'.startsWith('a')".into()]),
            ("endsWith", vec!["'ab'.endsWith('b')".into()]),
            ("int", vec!["int('3')".into()]),
            ("uint", vec!["uint(3)".into()]),
            ("double", vec!["double(3)".into()]),
            ("string", vec!["string(3)".into()]),
            ("bool", vec!["bool('true')".into()]),
            ("bytes", vec!["bytes('a')".into()]),
            ("timestamp", vec![at.into()]),
            ("duration", vec!["duration('1h')".into()]),
            ("type", vec!["type(1) == type(2)".into()]),
            ("dyn", vec!["dyn(1)".into()]),
            ("getFullYear", vec![format!("{at}.getFullYear()")]),
            ("getMonth", vec![format!("{at}.getMonth('Asia/Shanghai')")]),
            ("getDayOfMonth", vec![format!("{at}.getDayOfMonth()")]),
            ("getDate", vec![format!("{at}.getDate()")]),
            ("getDayOfWeek", vec![format!("{at}.getDayOfWeek()")]),
            ("getDayOfYear", vec![format!("{at}.getDayOfYear()")]),
            (
                "getHours",
                vec![
                    format!("{at}.getHours()"),
                    "duration('2h').getHours()".into(),
                ],
            ),
            ("getMinutes", vec![format!("{at}.getMinutes()")]),
            ("getSeconds", vec![format!("{at}.getSeconds()")]),
            ("getMilliseconds", vec![format!("{at}.getMilliseconds()")]),
        ]
        .into_iter()
        .collect();
        let accepted: BTreeSet<&str> = FUNCTIONS.iter().map(|f| f.name).collect();
        assert_eq!(
            examples.keys().copied().collect::<BTreeSet<_>>(),
            accepted,
            "each function the checker accepts needs an example here"
        );
        for src in examples.values().flatten() {
            let (checked, value) = run(src).unwrap_or_else(|e| panic!("`{src}`: {e}"));
            if checked != Ty::Dyn {
                assert_eq!(Some(checked), runtime_ty(&value), "`{src}`");
            }
        }
        for (_, form) in MACROS {
            let src = form
                .replace("value.field", "vars.level")
                .replace("list", "[1]")
                .replace("condition", "x > 0")
                .replace("expression", "x");
            assert!(compile(&src, &scope()).is_ok(), "`{src}`");
        }
    }

    /// Regression: `type(x) == int` was refused as "unknown name `int`",
    /// though the runtime resolves type names. Each name the checker accepts
    /// is compared here with the type of a value through the runtime's
    /// environment; names the runtime lacks are refused, as it refuses them.
    #[test]
    fn every_type_name_the_checker_accepts_runs() {
        let examples: BTreeMap<&str, &str> = [
            ("bool", "true"),
            ("bytes", "b'a'"),
            ("double", "1.5"),
            ("int", "1"),
            ("uint", "1u"),
            ("string", "'a'"),
            ("list", "[1]"),
            ("map", "{'a': 1}"),
            ("null_type", "null"),
            ("type", "int"),
            ("optional_type", ""),
            (
                "google.protobuf.Timestamp",
                "timestamp('2020-01-01T00:00:00Z')",
            ),
            ("google.protobuf.Duration", "duration('1h')"),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            examples.keys().copied().collect::<BTreeSet<_>>(),
            TYPE_NAMES.iter().copied().collect::<BTreeSet<_>>(),
            "each type name the checker accepts needs an example here"
        );
        for (name, value) in examples {
            // No standard function makes an optional value: its type is only named.
            let src = if value.is_empty() {
                format!("type({name}) == type && {name} == {name}")
            } else {
                format!(
                    "type({value}) == {name} && type({value}) != (type({value}) == int ? uint : int)"
                )
            };
            let (_, result) = run(&src).unwrap_or_else(|e| panic!("`{src}`: {e}"));
            assert_eq!(result, cel::Value::Bool(true), "`{src}`");
        }
        assert_eq!(
            issues("vars.count == 1 && type(now) == google.protobuf.Timestamp"),
            vec![]
        );
        assert_eq!(issues("[1].exists(int, int > 0)"), vec![]);
        for (name, type_name) in TYPE_NAMES_OF_FUNCTIONS.iter().copied().chain([("dyn", "")]) {
            let src = format!("type(1) == {name}");
            assert!(
                run(&src).is_err(),
                "the runtime has the type `{name}`: accept it"
            );
            let Err(found) = compile(&src, &scope()) else {
                panic!("`{src}` accepted")
            };
            assert_eq!(found[0].message, format!("unknown name `{name}`"));
            if !type_name.is_empty() {
                assert_eq!(
                    found[0].hint.as_deref(),
                    Some(format!("`{name}` is a function here, not a type: the type is named `{type_name}`").as_str())
                );
            }
        }
    }

    /// The extension functions are refused by the checker, as by the runtime,
    /// with a hint that says why instead of a look-alike.
    #[test]
    fn extension_functions_are_refused_as_the_runtime_refuses_them() {
        for (extension, names) in EXTENSIONS {
            for name in *names {
                let src = format!("'a'.{name}()");
                let context = cel::Context::with_env(environment());
                let runtime = Program::compile(&src).expect("parses").execute(&context);
                assert!(runtime.is_err(), "the runtime has `{name}`: accept it");
                let Err(found) = compile(&src, &scope()) else {
                    panic!("`{src}` accepted")
                };
                assert_eq!(found[0].message, format!("unknown function `{name}`"));
                assert_eq!(
                    found[0].hint.as_deref(),
                    Some(
                        format!(
                            "govflow has CEL's standard functions only, not its {extension} extension"
                        )
                        .as_str()
                    )
                );
            }
        }
        let method = issues("'3'.int()");
        assert_eq!(method[0].0, "`int` is a function, not a method");
        assert!(run("'3'.int()").is_err());
        assert_eq!(
            issues("startsWith('ab', 'a')")[0].0,
            "`startsWith` is a method, not a function"
        );
        assert_eq!(
            issues("[1].exists(x)"),
            vec![
                ("unknown name `x`".to_owned(), "unknown-name", 12),
                (
                    "`exists` must be written `list.exists(x, condition)`".to_owned(),
                    "unknown-name",
                    5
                )
            ]
        );
        assert_eq!(issues("'a'.sizee()")[0].0, "unknown function `sizee`");
    }

    /// Regression: an expression of any length was compiled, and one long
    /// enough (a chain of `.level` 5,000 long) overflowed the stack of the
    /// thread that compiled it, aborting the server.
    #[test]
    fn an_expression_over_the_length_limit_is_refused_before_it_is_parsed() {
        let long = format!("payload{}", ".level".repeat(400));
        let found = issues(&long);
        assert_eq!(found[0].1, "expr-too-long");
        assert_eq!(
            found[0].0,
            "the expression is 2407 characters long, over the limit of 2000"
        );
    }

    /// Regression: the parser's debugging form of its error was shown
    /// (`OtherError(ParseError { source: None, pos: (96, -1), … })`).
    /// Run, as expressions are, on a thread with `STACK_BYTES` of stack:
    /// the parser goes through a dozen rules per parenthesis, and in a
    /// debug build a test thread's default stack is too small for 96.
    #[test]
    fn an_expression_nested_too_deep_says_so_plainly() {
        let found = std::thread::Builder::new()
            .stack_size(STACK_BYTES)
            .spawn(|| issues(&format!("{}1{}", "(".repeat(200), ")".repeat(200))))
            .expect("thread")
            .join()
            .expect("no panic");
        assert_eq!(found[0].1, "expr-syntax");
        assert_eq!(
            found[0].0,
            "expression does not compile: it nests more than 96 levels deep"
        );
    }
}

//! CEL guards and effects: compiled once when a workflow loads, and checked
//! statically for unknown names and mismatched types.
//!
//! `cel` parses and evaluates; it has no type checker, so this module infers a
//! type for each node from the names a workflow declares (`vars`, `payload`,
//! `catalogues`, …). Where a type cannot be known it is `Dyn` and nothing is
//! reported: the checker never rejects an expression that could be right.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

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
                hint: None,
                line: e.pos.0.max(1) as usize,
                col: e.pos.1.max(1) as usize,
            })
            .collect::<Vec<_>>()
    })?;
    let mut checker = Checker {
        program: &program,
        issues: Vec::new(),
        uses: BTreeSet::new(),
    };
    let ty = checker.infer(program.expression(), scope);
    let Checker { issues, uses, .. } = checker;
    if issues.is_empty() {
        Ok(Compiled {
            program: Arc::new(program),
            ty,
            uses,
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
        if matches!(node.expr, Expr::Select(_)) {
            start += 1;
        }
        let (line, col) = line_col(&self.program.source_info().source, start);
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
                None => {
                    let hint = hint_for(name, "names", scope.names.keys().map(String::as_str));
                    self.report(node, "unknown-name", format!("unknown name `{name}`"), hint);
                    Ty::Dyn
                }
            },
            Expr::Select(select) => {
                // `root.field` reads one field of a top-level name, not all of it.
                let operand = match &select.operand.expr {
                    Expr::Ident(root) if scope.get(root).is_some() => {
                        self.uses.insert((root.clone(), Some(select.field.clone())));
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
        let target = call.target.as_ref().map(|t| self.infer(t, scope));
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
            operators::NOT_STRICTLY_FALSE | operators::IN | "has" => Ty::Bool,
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
            "size" => Ty::Int,
            "contains" | "startsWith" | "endsWith" | "matches" | "exists" | "all"
            | "exists_one" | "isSorted" => Ty::Bool,
            "int" | "getFullYear" | "getMonth" | "getDayOfMonth" | "getDate" | "getDayOfWeek"
            | "getDayOfYear" | "getHours" | "getMinutes" | "getSeconds" | "getMilliseconds"
            | "indexOf" | "lastIndexOf" => Ty::Int,
            "uint" => Ty::Uint,
            "double" => Ty::Double,
            "string" | "lowerAscii" | "upperAscii" | "trim" | "replace" | "substring"
            | "charAt" | "format" | "join" | "quote" => Ty::String,
            "bool" => Ty::Bool,
            "bytes" => Ty::Bytes,
            "timestamp" => Ty::Timestamp,
            "duration" => Ty::Duration,
            "split" => Ty::List(Box::new(Ty::String)),
            "map" | "filter" | "flatten" | "sort" | "distinct" | "reverse" | "slice" => {
                match target {
                    Some(Ty::List(_)) | Some(Ty::Map(_)) => Ty::List(Box::new(Ty::Dyn)),
                    _ => Ty::Dyn,
                }
            }
            "max" | "min" | "type" | "dyn" | "abs" | "ceil" | "floor" | "round" | "greatest"
            | "least" => Ty::Dyn,
            _ => {
                let known = KNOWN_FUNCTIONS.iter().copied();
                self.report(
                    node,
                    "unknown-name",
                    format!("unknown function `{name}`"),
                    super::diag::did_you_mean(name, known),
                );
                Ty::Dyn
            }
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

const KNOWN_FUNCTIONS: &[&str] = &[
    "size",
    "contains",
    "startsWith",
    "endsWith",
    "matches",
    "int",
    "uint",
    "double",
    "string",
    "bool",
    "bytes",
    "timestamp",
    "duration",
    "split",
    "join",
    "lowerAscii",
    "upperAscii",
    "trim",
    "replace",
    "substring",
    "charAt",
    "indexOf",
    "lastIndexOf",
    "getFullYear",
    "getMonth",
    "getDayOfMonth",
    "getDayOfWeek",
    "getDayOfYear",
    "getHours",
    "getMinutes",
    "getSeconds",
    "max",
    "min",
    "exists",
    "all",
    "exists_one",
    "map",
    "filter",
    "has",
    "type",
    "dyn",
];

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
    fn syntax_errors_are_located() {
        let found = issues("vars.count +");
        assert_eq!(found[0].1, "expr-syntax");
        assert_eq!(found[0].2, 13);
        assert_eq!(found[0].0, "expression does not compile: it ends too early");
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

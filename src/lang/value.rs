//! Values of case variables and payload fields: checked against their declared
//! type, normalised, and seen by CEL.
//!
//! Values are JSON (`serde_json::Value`) everywhere in the engine, so that
//! what a gRPC client sends, what a scenario writes in RON and what is stored
//! all take one path through [`check`].

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate};
use serde_json::Value as Json;

use super::model::{Agencies, Agency, Level, Type};

/// Largest integer a variable may hold: what JSON numbers (and protobuf
/// `Struct`, which every client library maps them to) carry exactly.
pub const MAX_EXACT_INTEGER: i64 = (1 << 53) - 1;

/// The agency directory, indexed.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    by_id: HashMap<String, Agency>,
}

impl Directory {
    pub fn new(agencies: &Agencies) -> Self {
        Directory {
            by_id: agencies
                .agencies
                .iter()
                .map(|a| (a.id.clone(), a.clone()))
                .collect(),
        }
    }

    /// What to say of `id`, which is not an agency of the directory: with
    /// the closest id, when one is close (ids are long and dotted, easily
    /// misspelt).
    pub fn unknown(&self, id: &str) -> String {
        let close = super::diag::did_you_mean(id, self.ids());
        match close {
            Some(hint) => format!("`{id}` is not an agency of the directory ({hint})"),
            None => format!("`{id}` is not an agency of the directory"),
        }
    }

    pub fn get(&self, id: &str) -> Option<&Agency> {
        self.by_id.get(id)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.by_id.keys().map(String::as_str)
    }

    pub fn parent(&self, id: &str) -> Option<&Agency> {
        self.get(id)?.parent.as_deref().and_then(|p| self.get(p))
    }

    /// The agency itself if it is at `level`, else its nearest ancestor at that level.
    pub fn ancestor_at(&self, id: &str, level: Level) -> Option<&Agency> {
        let mut current = self.get(id)?;
        for _ in 0..=self.by_id.len() {
            if current.level == level {
                return Some(current);
            }
            current = self.parent(&current.id)?;
        }
        None
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// A RON value as JSON (maps keep their keys as strings).
pub fn ron_to_json(value: &ron::Value) -> Json {
    use ron::Value as R;
    match value {
        R::Bool(b) => Json::Bool(*b),
        R::Char(c) => Json::String(c.to_string()),
        R::String(s) => Json::String(s.clone()),
        R::Bytes(b) => Json::String(String::from_utf8_lossy(b).into_owned()),
        R::Number(n) => number_to_json(n),
        R::Option(None) | R::Unit => Json::Null,
        R::Option(Some(v)) => ron_to_json(v),
        R::Seq(items) => Json::Array(items.iter().map(ron_to_json).collect()),
        R::Map(map) => Json::Object(
            map.iter()
                .map(|(k, v)| {
                    let key = match k {
                        R::String(s) => s.clone(),
                        other => ron_to_json(other).to_string(),
                    };
                    (key, ron_to_json(v))
                })
                .collect(),
        ),
    }
}

fn number_to_json(n: &ron::Number) -> Json {
    use ron::Number as N;
    match *n {
        N::I8(v) => v.into(),
        N::I16(v) => v.into(),
        N::I32(v) => v.into(),
        N::I64(v) => v.into(),
        N::U8(v) => v.into(),
        N::U16(v) => v.into(),
        N::U32(v) => v.into(),
        N::U64(v) => v.into(),
        N::F32(v) => {
            serde_json::Number::from_f64(f64::from(v.get())).map_or(Json::Null, Json::Number)
        }
        N::F64(v) => serde_json::Number::from_f64(v.get()).map_or(Json::Null, Json::Number),
        #[allow(unreachable_patterns)]
        _ => Json::Null,
    }
}

/// Checks `value` against `ty` and returns it in normal form: decimals as
/// canonical strings, times as RFC 3339 in UTC. The error says what was
/// expected and what was found.
fn outside_exact_integers(n: impl std::fmt::Display) -> String {
    format!(
        "integer {n} is outside ±{MAX_EXACT_INTEGER} (2^53 − 1), the range JSON and protobuf's Value carry exactly"
    )
}

pub fn check(value: &Json, ty: &Type, directory: Option<&Directory>) -> Result<Json, String> {
    let found = || describe(value);
    match (ty, value) {
        (Type::String, Json::String(_)) | (Type::Boolean, Json::Bool(_)) => Ok(value.clone()),
        (Type::Integer, Json::Number(n)) => match n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() <= MAX_EXACT_INTEGER as f64)
                .map(|f| f as i64)
        }) {
            Some(i) if i.unsigned_abs() <= MAX_EXACT_INTEGER as u64 => Ok(Json::from(i)),
            Some(_) => Err(outside_exact_integers(n)),
            None if n.as_f64().is_some_and(|f| f.fract() == 0.0) => Err(outside_exact_integers(n)),
            None => Err(format!("expected an integer, found number {n}")),
        },
        (Type::Integer, Json::String(s)) => match s.parse::<i64>() {
            Ok(i) if i.unsigned_abs() <= MAX_EXACT_INTEGER as u64 => Ok(Json::from(i)),
            Ok(_) => Err(outside_exact_integers(s)),
            Err(_) if s.parse::<i128>().is_ok() => Err(outside_exact_integers(s)),
            Err(_) => Err(format!("expected an integer, found string \"{s}\"")),
        },
        // A double in positional notation: JSON's shortest form writes
        // 0.0000001 as `1e-7`, which is no decimal.
        (Type::Decimal, Json::Number(n)) => match n.as_f64().filter(|_| n.is_f64()) {
            Some(f) => decimal(&f.to_string()),
            None => decimal(&n.to_string()),
        },
        (Type::Decimal, Json::String(s)) => decimal(s),
        (Type::Date, Json::String(s)) => NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .map_err(|_| format!("expected a date YYYY-MM-DD, found `{s}`"))
            .and_then(|d| {
                within_years(s, chrono::Datelike::year(&d)).map(|()| Json::String(d.to_string()))
            }),
        (Type::Time, Json::String(s)) => DateTime::parse_from_rfc3339(s)
            .map_err(|_| {
                format!("expected a time in RFC 3339 (2020-06-01T09:00:00+08:00), found `{s}`")
            })
            .and_then(|t| {
                let t = t.to_utc();
                within_years(s, chrono::Datelike::year(&t))
                    .map(|()| Json::String(t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)))
            }),
        (Type::Enum(allowed), Json::String(s)) => {
            if allowed.iter().any(|a| a == s) {
                Ok(value.clone())
            } else {
                Err(format!("`{s}` is not one of {}", allowed.join(", ")))
            }
        }
        (Type::Agency, Json::String(s)) => match directory {
            Some(dir) if !dir.contains(s) => Err(dir.unknown(s)),
            _ => Ok(value.clone()),
        },
        (Type::List(inner), Json::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| check(item, inner, directory).map_err(|e| format!("item {i}: {e}")))
            .collect::<Result<Vec<_>, _>>()
            .map(Json::Array),
        _ => Err(format!("expected {}, found {}", type_name(ty), found())),
    }
}

fn decimal(s: &str) -> Result<Json, String> {
    let t = s.trim();
    let digits = t.strip_prefix('-').unwrap_or(t);
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let ok = !int.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.bytes().all(|b| b.is_ascii_digit())
        && !(digits.contains('.') && frac.is_empty());
    if !ok {
        return Err(format!("expected a decimal like \"12.50\", found `{s}`"));
    }
    let int = int.trim_start_matches('0');
    let frac = frac.trim_end_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    let sign = if t.starts_with('-') && (int != "0" || !frac.is_empty()) {
        "-"
    } else {
        ""
    };
    Ok(Json::String(if frac.is_empty() {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    }))
}

/// How a type is named in messages.
pub fn type_name(ty: &Type) -> String {
    match ty {
        Type::String => "a string".into(),
        Type::Integer => "an integer".into(),
        Type::Decimal => "a decimal".into(),
        Type::Boolean => "a boolean".into(),
        Type::Date => "a date".into(),
        Type::Time => "a time".into(),
        Type::Agency => "an agency id".into(),
        Type::Enum(values) => format!("one of {}", values.join(", ")),
        Type::List(inner) => format!(
            "a list of {}",
            type_name(inner)
                .trim_start_matches("a ")
                .trim_start_matches("an ")
        ),
    }
}

/// Dates and times are kept within the years 0001–9999 (in UTC): the range of
/// RFC 3339 and of `google.protobuf.Timestamp`, in which they are written and
/// read back (a time of 9999-12-31 at UTC−23:59 is in the year 10000 in UTC,
/// and was stored as `+10000-…`, which no reader takes).
fn within_years(written: &str, year: i32) -> Result<(), String> {
    if (1..=9999).contains(&year) {
        Ok(())
    } else {
        Err(format!(
            "`{written}` falls in the year {year} (in UTC): dates and times must fall within the years 0001–9999"
        ))
    }
}

fn describe(value: &Json) -> String {
    match value {
        Json::Null => "nothing".into(),
        Json::Bool(b) => format!("boolean {b}"),
        Json::Number(n) => format!("number {n}"),
        Json::String(s) => format!("string \"{s}\""),
        Json::Array(_) => "a list".into(),
        Json::Object(_) => "a map".into(),
    }
}

/// A normalised value as CEL sees it (decimals as doubles, times as timestamps).
pub fn to_cel(value: &Json, ty: Option<&Type>) -> cel::Value {
    match (ty, value) {
        (Some(Type::Decimal), Json::String(s)) => {
            s.parse::<f64>().map_or(cel::Value::Null, cel::Value::Float)
        }
        (Some(Type::Time), Json::String(s)) => {
            DateTime::parse_from_rfc3339(s).map_or(cel::Value::Null, cel::Value::Timestamp)
        }
        (Some(Type::List(inner)), Json::Array(items)) => cel::Value::List(
            items
                .iter()
                .map(|i| to_cel(i, Some(inner)))
                .collect::<Vec<_>>()
                .into(),
        ),
        (_, Json::Null) => cel::Value::Null,
        (_, Json::Bool(b)) => cel::Value::Bool(*b),
        (_, Json::Number(n)) => match n.as_i64() {
            Some(i) => cel::Value::Int(i),
            None => cel::Value::Float(n.as_f64().unwrap_or_default()),
        },
        (_, Json::String(s)) => cel::Value::String(s.clone().into()),
        (_, Json::Array(items)) => cel::Value::List(
            items
                .iter()
                .map(|i| to_cel(i, None))
                .collect::<Vec<_>>()
                .into(),
        ),
        (_, Json::Object(map)) => {
            let entries: HashMap<String, cel::Value> = map
                .iter()
                .map(|(k, v)| (k.clone(), to_cel(v, None)))
                .collect();
            cel::Value::from(entries)
        }
    }
}

/// A CEL result as a value of `ty`, checked.
pub fn from_cel(
    value: &cel::Value,
    ty: &Type,
    directory: Option<&Directory>,
) -> Result<Json, String> {
    let json = match value {
        cel::Value::Null => return Ok(Json::Null),
        cel::Value::Bool(b) => Json::Bool(*b),
        cel::Value::Int(i) => Json::from(*i),
        cel::Value::UInt(u) => Json::from(*u),
        cel::Value::Float(f) => match ty {
            Type::Decimal => Json::String(format!("{f}")),
            _ => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        },
        cel::Value::String(s) => Json::String(s.to_string()),
        cel::Value::Timestamp(t) => Json::String(t.to_rfc3339()),
        cel::Value::List(items) => {
            let inner = match ty {
                Type::List(inner) => inner.as_ref(),
                _ => return Err(format!("expected {}, found a list", type_name(ty))),
            };
            Json::Array(
                items
                    .iter()
                    .map(|i| from_cel(i, inner, directory))
                    .collect::<Result<_, _>>()?,
            )
        }
        other => return Err(format!("expected {}, found {other:?}", type_name(ty))),
    };
    check(&json, ty, directory)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_are_checked_and_normalised() {
        assert_eq!(
            check(&json!("12.500"), &Type::Decimal, None),
            Ok(json!("12.5"))
        );
        assert_eq!(check(&json!(3), &Type::Decimal, None), Ok(json!("3")));
        // Regression: a small double arrived as `1e-7` and was refused.
        assert_eq!(
            check(&json!(0.0000001), &Type::Decimal, None),
            Ok(json!("0.0000001"))
        );
        assert_eq!(check(&json!(4.5), &Type::Decimal, None), Ok(json!("4.5")));
        assert!(check(&json!("1,000"), &Type::Decimal, None).is_err());
        assert_eq!(
            check(&json!("2020-06-01T09:00:00+08:00"), &Type::Time, None),
            Ok(json!("2020-06-01T01:00:00Z"))
        );
        assert!(check(&json!("2020-13-01"), &Type::Date, None).is_err());
        // Regression: a time in the year 10000 in UTC was stored as
        // `+10000-…`, which no reader takes; years 0 and -1 were kept too.
        for (time, ty) in [
            ("9999-12-31T23:59:59-23:59", Type::Time),
            ("0000-01-01T00:00:00Z", Type::Time),
            ("0000-06-01", Type::Date),
        ] {
            let refused = check(&json!(time), &ty, None).expect_err(time);
            assert!(refused.contains("within the years 0001–9999"), "{refused}");
        }
        assert_eq!(
            check(&json!("9999-12-31T23:59:59Z"), &Type::Time, None),
            Ok(json!("9999-12-31T23:59:59Z"))
        );
        let level = Type::Enum(vec!["county".into(), "city".into()]);
        assert_eq!(
            check(&json!("town"), &level, None),
            Err("`town` is not one of county, city".into())
        );
        assert_eq!(check(&json!(5.0), &Type::Integer, None), Ok(json!(5)));
        assert!(check(&json!(5.5), &Type::Integer, None).is_err());
        assert!(check(&json!(1_i64 << 60), &Type::Integer, None).is_err());
        // The one integer whose absolute value overflows is outside the range too.
        assert!(check(&json!(i64::MIN), &Type::Integer, None).is_err());
        assert!(check(&json!(i64::MIN.to_string()), &Type::Integer, None).is_err());
        // An integer too large is called that, whatever form it came in.
        for big in [
            json!(9_007_199_254_740_992.0),
            json!("9007199254740993"),
            json!(u64::MAX),
        ] {
            let e = check(&big, &Type::Integer, None).unwrap_err();
            assert!(e.contains("is outside ±9007199254740991"), "{big}: {e}");
        }
        let e = check(&json!(1.5), &Type::Integer, None).unwrap_err();
        assert_eq!(e, "expected an integer, found number 1.5");
        assert_eq!(
            check(&json!(-MAX_EXACT_INTEGER), &Type::Integer, None),
            Ok(json!(-MAX_EXACT_INTEGER))
        );
        assert_eq!(
            check(&json!([1, "x"]), &Type::List(Box::new(Type::Integer)), None),
            Err("item 1: expected an integer, found string \"x\"".into())
        );
        assert_eq!(
            check(&json!(true), &Type::String, None),
            Err("expected a string, found boolean true".into())
        );
    }

    /// The directory of `source` (an `Agencies(…)` RON text).
    fn directory(source: &str) -> Directory {
        let agencies: Agencies = crate::lang::load::ron_options()
            .from_str(source)
            .expect("parses");
        Directory::new(&agencies)
    }

    #[test]
    fn directory_walks_up_to_a_level() {
        let dir = directory(
            r#"Agencies(agencies: [
                Agency(id: "p", name: "省", level: Province),
                Agency(id: "c", name: "市", level: City, parent: "p"),
                Agency(id: "k", name: "县", level: County, parent: "c"),
            ])"#,
        );
        assert_eq!(dir.parent("k").map(|a| a.id.as_str()), Some("c"));
        assert_eq!(
            dir.ancestor_at("k", Level::Province).map(|a| a.id.as_str()),
            Some("p")
        );
        assert_eq!(
            dir.ancestor_at("k", Level::County).map(|a| a.id.as_str()),
            Some("k")
        );
        assert!(dir.ancestor_at("p", Level::County).is_none());
        assert!(check(&json!("x"), &Type::Agency, Some(&dir)).is_err());
    }

    /// Regression: a misspelt agency id got no suggestion, although
    /// misspelt fields and events do.
    #[test]
    fn an_unknown_agency_id_is_told_the_closest_one() {
        let dir = directory(
            r#"Agencies(agencies: [
                Agency(id: "hebei", name: "省", level: Province),
                Agency(id: "hebei.sjz", name: "市", level: City, parent: "hebei"),
                Agency(id: "hebei.sjz.power", name: "供电公司", level: City, parent: "hebei.sjz"),
            ])"#,
        );
        assert_eq!(
            check(&json!("hebei.sjz.powr"), &Type::Agency, Some(&dir)),
            Err("`hebei.sjz.powr` is not an agency of the directory (did you mean `hebei.sjz.power`?)".into())
        );
        assert_eq!(
            dir.unknown("nowhere"),
            "`nowhere` is not an agency of the directory"
        );
    }
}

//! `--set` and `--set-string` as Helm's strvals reads them: `a.b=1,c[0].d=x`, lists as `{a,b}`,
//! `true`/`false`/integers/`null` typed, backslash escapes.

use serde_json::{Map, Value, json};

use super::ValuesError;

#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// Apply one `--set` argument (`a.b=1,c[0]=x,d={p,q}`) to a complete tree, in place: lists are
/// indexed as they stand and `null` removes the key. (`--set` on the command line goes through
/// [`Values::load`], which writes into the user's values first, as Helm does.)
pub fn apply_set(tree: &mut Value, expr: &str, string_only: bool) -> Result<(), ValuesError> {
    set_values(tree, expr, string_only, false)
}

/// Write one `--set` argument into `tree`. With `keep_null`, `key=null` stores a null (which
/// removes the default when the user's values are laid over the defaults) instead of removing
/// the key.
pub(super) fn set_values(
    tree: &mut Value,
    expr: &str,
    string_only: bool,
    keep_null: bool,
) -> Result<(), ValuesError> {
    let err = |why: String| ValuesError::Set {
        expr: expr.to_string(),
        why,
    };
    for assignment in split_unescaped(expr, ',', true) {
        if assignment.is_empty() {
            continue;
        }
        let Some(eq) = find_unescaped(&assignment, '=') else {
            return Err(err(format!("{assignment:?} has no '='")));
        };
        let (key, raw) = (&assignment[..eq], &assignment[eq + 1..]);
        let path = parse_path(key).map_err(err)?;
        let value = if !string_only && raw.starts_with('{') && raw.ends_with('}') {
            let inner = &raw[1..raw.len() - 1];
            Value::Array(
                split_unescaped(inner, ',', false)
                    .iter()
                    .filter(|s| !s.is_empty())
                    .map(|s| typed_scalar(&unescape(s), false))
                    .collect(),
            )
        } else {
            typed_scalar(&unescape(raw), string_only)
        };
        set_path(tree, &path, value, keep_null).map_err(err)?;
    }
    Ok(())
}

/// Split on `sep` outside `{...}` (when `braces`) and not after a backslash.
fn split_unescaped(s: &str, sep: char, braces: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut depth = 0usize;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                cur.push(c);
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '{' if braces => {
                depth += 1;
                cur.push(c);
            }
            '}' if braces => {
                depth = depth.saturating_sub(1);
                cur.push(c);
            }
            c if c == sep && depth == 0 => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

fn find_unescaped(s: &str, target: char) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == target {
            return Some(i);
        }
    }
    None
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Helm's typing of `--set` values: booleans, integers and null; everything else a string.
fn typed_scalar(s: &str, string_only: bool) -> Value {
    if string_only {
        return Value::String(s.to_string());
    }
    match s {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        "null" => Value::Null,
        _ => match s.parse::<i64>() {
            // Helm keeps numbers with a leading zero (e.g. "0755") as strings.
            Ok(n) if !(s.len() > 1 && s.starts_with('0')) => json!(n),
            _ => Value::String(s.to_string()),
        },
    }
}

fn parse_path(key: &str) -> Result<Vec<Seg>, String> {
    let mut segs = Vec::new();
    for part in split_unescaped(key, '.', false) {
        let part = part.trim();
        if part.is_empty() {
            return Err(format!("key {key:?} has an empty part"));
        }
        let (name, mut rest) = match find_unescaped(part, '[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !name.is_empty() {
            segs.push(Seg::Key(unescape(name)));
        } else if segs.is_empty() {
            return Err(format!("key {key:?} starts with an index"));
        }
        while !rest.is_empty() {
            let close = rest
                .find(']')
                .ok_or_else(|| format!("key {key:?} has an unclosed '['"))?;
            let idx: usize = rest[1..close]
                .parse()
                .map_err(|_| format!("key {key:?}: {:?} is not a list index", &rest[1..close]))?;
            if idx > 1024 {
                return Err(format!("key {key:?}: index {idx} is too large"));
            }
            segs.push(Seg::Index(idx));
            rest = &rest[close + 1..];
            if !rest.is_empty() && !rest.starts_with('[') {
                return Err(format!("key {key:?}: unexpected {rest:?} after an index"));
            }
        }
    }
    if segs.is_empty() {
        return Err("the key is empty".into());
    }
    Ok(segs)
}

fn set_path(tree: &mut Value, path: &[Seg], value: Value, keep_null: bool) -> Result<(), String> {
    let (last, parents) = path.split_last().expect("paths are never empty");
    let mut cur = tree;
    for (i, seg) in parents.iter().enumerate() {
        let next_is_index = matches!(path[i + 1], Seg::Index(_));
        let fresh = || {
            if next_is_index {
                Value::Array(Vec::new())
            } else {
                Value::Object(Map::new())
            }
        };
        cur = match seg {
            Seg::Key(k) => {
                if !cur.is_object() {
                    *cur = Value::Object(Map::new());
                }
                let map = cur.as_object_mut().expect("just made a map");
                let slot = map.entry(k.clone()).or_insert_with(fresh);
                if slot.is_null() || (next_is_index != slot.is_array()) && !slot.is_object() {
                    *slot = fresh();
                }
                if next_is_index && !slot.is_array() {
                    *slot = fresh();
                }
                slot
            }
            Seg::Index(n) => {
                if !cur.is_array() {
                    *cur = Value::Array(Vec::new());
                }
                let list = cur.as_array_mut().expect("just made a list");
                while list.len() <= *n {
                    list.push(Value::Null);
                }
                if list[*n].is_null() {
                    list[*n] = fresh();
                }
                &mut list[*n]
            }
        };
    }
    match last {
        Seg::Key(k) => {
            if !cur.is_object() {
                *cur = Value::Object(Map::new());
            }
            let map = cur.as_object_mut().expect("just made a map");
            if value.is_null() && !keep_null {
                map.remove(k);
            } else {
                map.insert(k.clone(), value);
            }
        }
        Seg::Index(n) => {
            if !cur.is_array() {
                *cur = Value::Array(Vec::new());
            }
            let list = cur.as_array_mut().expect("just made a list");
            while list.len() <= *n {
                list.push(Value::Null);
            }
            list[*n] = value;
        }
    }
    Ok(())
}

//! Chat templates rendered as `transformers` renders them for vLLM.
//!
//! `transformers`' `apply_chat_template` compiles the template in a sandboxed Jinja2
//! environment with `trim_blocks` and `lstrip_blocks` on, the `loopcontrols` extension, and
//! three additions: a `tojson` filter that is Python's `json.dumps` (`ensure_ascii=False`,
//! so text stays as written, `", "` and `": "` separators, optional `indent`, `sort_keys`),
//! and the globals `raise_exception(message)` and `strftime_now(format)`. This module builds
//! the same environment on `minijinja`, with Python's string and dict methods
//! (`minijinja_contrib::pycompat`: `.strip()`, `.startswith()`, `.items()`, ...).
//!
//! Rendering is bounded: a template gets a fixed amount of fuel (instructions), so a
//! template that loops without end fails instead of holding a thread.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};

/// Instructions one rendering may execute: far above what a chat of a few megabytes needs
/// with any real template (a few per message part), far below an endless loop.
const FUEL: u64 = 50_000_000;

/// Why a template could not be compiled or rendered.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template does not compile.
    #[error("chat template does not compile: {0}")]
    Compile(String),
    /// Rendering failed (`raise_exception`, an unknown method, out of fuel).
    #[error("chat template failed: {0}")]
    Render(String),
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatTemplate")
    }
}

const NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles `source`.
    pub fn new(source: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TemplateError::Compile(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source.to_owned())
            .map_err(|e| TemplateError::Compile(e.to_string()))?;
        Ok(Self { env })
    }

    /// Renders with `ctx` (a map: `messages`, `tools`, `add_generation_prompt`, the special
    /// tokens, the request's `chat_template_kwargs`).
    pub fn render(&self, ctx: Value) -> Result<String, TemplateError> {
        let t = self
            .env
            .get_template(NAME)
            .map_err(|e| TemplateError::Render(e.to_string()))?;
        t.render(ctx).map_err(|e| TemplateError::Render(describe(&e)))
    }

    /// Variables the template reads at its top level (vLLM passes a request's
    /// `chat_template_kwargs` only where the template reads them).
    pub fn variables(&self) -> std::collections::HashSet<String> {
        self.env
            .get_template(NAME)
            .map(|t| t.undeclared_variables(false))
            .unwrap_or_default()
    }
}

fn describe(e: &Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        let _ = write!(s, ": {inner}");
        source = inner.source();
    }
    s
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

fn strftime_now(format: String) -> Result<Value, Error> {
    use chrono::format::{Item, StrftimeItems};
    let items: Vec<Item<'_>> = StrftimeItems::new(&format).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("bad strftime format {format:?}"),
        ));
    }
    Ok(Value::from(
        chrono::Local::now()
            .format_with_items(items.into_iter())
            .to_string(),
    ))
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=sort_keys)`, as
/// `transformers` defines `tojson` for chat templates.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_i64() {
            Some(n) => Some(" ".repeat(usize::try_from(n).unwrap_or(0))),
            None => Some(v.as_str().unwrap_or_default().to_owned()),
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if !s.is_none() => {
            let a = s.get_item_by_index(0)?;
            let b = s.get_item_by_index(1)?;
            (
                a.as_str().unwrap_or(",").to_owned(),
                b.as_str().unwrap_or(":").to_owned(),
            )
        }
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let style = Style {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    style.write(&mut out, value, 0)?;
    Ok(Value::from_safe_string(out))
}

struct Style {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl Style {
    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(indent);
            }
        }
    }

    fn write(&self, out: &mut String, v: &Value, depth: usize) -> Result<(), Error> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if v.is_integer() {
                    let _ = write!(out, "{v}");
                } else {
                    let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                    out.push_str(&python_float(f));
                }
            }
            ValueKind::String => json_string(out, v.as_str().unwrap_or_default()),
            ValueKind::Bytes => json_string(out, &String::from_utf8_lossy(v.as_bytes().unwrap_or_default())),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.container(out, depth, '[', ']', &items, |out, item, depth| {
                    self.write(out, item, depth)
                })?;
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                let pairs: Vec<(Value, Value)> = keys
                    .into_iter()
                    .map(|k| {
                        let item = v.get_item(&k)?;
                        Ok((k, item))
                    })
                    .collect::<Result<_, Error>>()?;
                self.container(out, depth, '{', '}', &pairs, |out, (k, item), depth| {
                    match k.as_str() {
                        Some(s) => json_string(out, s),
                        None => json_string(out, &k.to_string()),
                    }
                    out.push_str(&self.key_sep);
                    self.write(out, item, depth)
                })?;
            }
            _ => json_string(out, &v.to_string()),
        }
        Ok(())
    }

    fn container<T>(
        &self,
        out: &mut String,
        depth: usize,
        open: char,
        close: char,
        items: &[T],
        mut each: impl FnMut(&mut String, &T, usize) -> Result<(), Error>,
    ) -> Result<(), Error> {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return Ok(());
        }
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            self.newline(out, depth + 1);
            each(out, item, depth + 1)?;
        }
        self.newline(out, depth);
        out.push(close);
        Ok(())
    }
}

/// A JSON string as Python's `json.dumps(..., ensure_ascii=False)` writes it.
fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A float as Python's `repr` (and so `json.dumps`) writes it: the shortest digits that read
/// back, fixed notation for exponents in [-4, 16), else `1e+16`; `NaN`, `Infinity`.
pub(crate) fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "1.5e16", "-2e-5".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1;
        let s = if point <= 0 {
            format!("0.{}{digits}", "0".repeat(point.unsigned_abs() as usize))
        } else if point as usize >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            let (a, b) = digits.split_at(point as usize);
            format!("{a}.{b}")
        };
        format!("{sign}{s}")
    } else {
        let (first, rest) = digits.split_at(1);
        let m = if rest.is_empty() {
            first.to_owned()
        } else {
            format!("{first}.{rest}")
        };
        let e_sign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{e_sign}{:02}", exp.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, ctx: serde_json::Value) -> String {
        ChatTemplate::new(src)
            .unwrap()
            .render(Value::from(minijinja::value::Serde(ctx)))
            .unwrap()
    }

    #[test]
    fn tojson_is_pythons_json_dumps() {
        let ctx = serde_json::json!({"x": {"b": [1, 2.5, "é\n\"", null, true], "a": {}}});
        assert_eq!(
            render("{{ x | tojson }}", ctx.clone()),
            r#"{"b": [1, 2.5, "é\n\"", null, true], "a": {}}"#
        );
        assert_eq!(
            render("{{ x | tojson(indent=2) }}", ctx.clone()),
            "{\n  \"b\": [\n    1,\n    2.5,\n    \"é\\n\\\"\",\n    null,\n    true\n  ],\n  \"a\": {}\n}"
        );
        assert_eq!(
            render("{{ x | tojson(sort_keys=true) }}", ctx),
            r#"{"a": {}, "b": [1, 2.5, "é\n\"", null, true]}"#
        );
        assert_eq!(render("{{ '<&>' | tojson }}", serde_json::json!({})), r#""<&>""#);
    }

    #[test]
    fn floats_print_as_python_repr() {
        for (f, s) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (100.0, "100.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (-2.5, "-2.5"),
            (123456789.125, "123456789.125"),
        ] {
            assert_eq!(python_float(f), s, "{f}");
        }
    }

    #[test]
    fn hf_environment() {
        // trim_blocks and lstrip_blocks, loop controls, python methods.
        let src = "{% for m in messages %}\n  {% if loop.index > 2 %}{% break %}{% endif %}\n[{{ m.content.strip() }}]\n{% endfor %}";
        let out = render(
            src,
            serde_json::json!({"messages": [{"content": " a "}, {"content": "b"}, {"content": "c"}]}),
        );
        assert_eq!(out, "[a]\n[b]\n");
        let e = ChatTemplate::new("{{ raise_exception('no system role') }}")
            .unwrap()
            .render(Value::from(()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no system role"), "{e}");
        let year = render("{{ strftime_now('%Y') }}", serde_json::json!({}));
        assert_eq!(year.len(), 4);
        // An endless loop runs out of fuel.
        let e = ChatTemplate::new(
            "{% for i in range(100000000) %}{% for j in range(1000) %}x{% endfor %}{% endfor %}",
        )
        .unwrap()
        .render(Value::from(()))
        .unwrap_err();
        assert!(
            e.to_string().contains("fuel") || e.to_string().contains("range"),
            "{e}"
        );
    }
}

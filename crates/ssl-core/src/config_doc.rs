//! A configuration type's defaults as TOML with every key explained (what `ssl config`
//! prints), the explanations taken from the type's doc comments through its JSON schema
//! (`#[derive(schemars::JsonSchema)]`), so they cannot drift from the code.

use schemars::JsonSchema;
use serde::Serialize;
use serde_json::{Map, Value as Json};
use toml::{Table, Value};

use crate::{CoreError, Result};

/// Width the comments are wrapped to.
const WIDTH: usize = 96;

/// The default of `T` as commented TOML: each table and key preceded by its doc comment and,
/// for a choice, its allowed values; `title` opens the file. The text parses back to the
/// defaults.
pub fn commented_toml<T: Serialize + JsonSchema + Default>(title: &str) -> Result<String> {
    commented_toml_of(&T::default(), title)
}

/// [`commented_toml`] of the values `cfg` holds instead of the type's defaults (e.g. the
/// defaults one pipeline chooses for a configuration type several share).
pub fn commented_toml_of<T: Serialize + JsonSchema>(cfg: &T, title: &str) -> Result<String> {
    let table = Table::try_from(cfg)
        .map_err(|e| CoreError::Config(format!("serialising defaults: {e}")))?;
    let schema = schemars::schema_for!(T);
    let root = schema.as_value().clone();
    let defs = root
        .get("$defs")
        .and_then(Json::as_object)
        .cloned()
        .unwrap_or_default();
    let mut out = String::new();
    for line in title.lines() {
        out.push_str(&format!("# {line}\n").replace("# \n", "#\n"));
    }
    out.push('\n');
    let doc = Docs { defs: &defs };
    doc.table(&mut out, &[], &table, &root);
    Ok(out)
}

struct Docs<'a> {
    defs: &'a Map<String, Json>,
}

impl Docs<'_> {
    /// Follows `$ref`s (and a lone `allOf` wrapper) to the schema they name.
    fn resolve<'s>(&'s self, mut s: &'s Json) -> &'s Json {
        for _ in 0..16 {
            if let Some(r) = s.get("$ref").and_then(Json::as_str) {
                let name = r.rsplit('/').next().unwrap_or_default();
                match self.defs.get(name) {
                    Some(d) => s = d,
                    None => return s,
                }
            } else if let Some([one]) = s.get("allOf").and_then(Json::as_array).map(Vec::as_slice) {
                s = one;
            } else {
                return s;
            }
        }
        s
    }

    /// A property's description: its own (the field's doc comment), else its type's.
    fn description(&self, prop: &Json) -> Option<String> {
        prop.get("description")
            .or_else(|| self.resolve(prop).get("description"))
            .and_then(Json::as_str)
            .map(str::to_string)
    }

    /// The allowed values of a choice (with each value's description, when it has one).
    fn choices(&self, prop: &Json) -> Vec<(String, Option<String>)> {
        let s = self.resolve(prop);
        let mut out = Vec::new();
        if let Some(values) = s.get("enum").and_then(Json::as_array) {
            out.extend(values.iter().map(|v| (v.to_string(), None)));
        }
        for key in ["oneOf", "anyOf"] {
            for v in s.get(key).and_then(Json::as_array).into_iter().flatten() {
                let desc = v
                    .get("description")
                    .and_then(Json::as_str)
                    .map(str::to_string);
                if let Some(c) = v.get("const") {
                    out.push((c.to_string(), desc));
                } else if let Some(values) = v.get("enum").and_then(Json::as_array) {
                    let n = values.len();
                    out.extend(
                        values
                            .iter()
                            .map(|e| (e.to_string(), if n == 1 { desc.clone() } else { None })),
                    );
                }
            }
        }
        out
    }

    /// The schema of property `key` of the object schema `s`.
    /// (For an internally tagged enum, the first variant that has the key.)
    fn property<'s>(&'s self, s: &'s Json, key: &str) -> Option<&'s Json> {
        let s = self.resolve(s);
        if let Some(p) = s.get("properties").and_then(|p| p.get(key)) {
            return Some(p);
        }
        ["oneOf", "anyOf"]
            .iter()
            .filter_map(|k| s.get(*k).and_then(Json::as_array))
            .flatten()
            .find_map(|v| self.property(v, key))
    }

    /// For the tag key of an internally tagged enum (`#[serde(tag = "...")]`): each variant's
    /// tag value and description.
    fn tag_choices(&self, s: &Json, key: &str) -> Option<Vec<(String, String)>> {
        let variants = self.resolve(s).get("oneOf")?.as_array()?;
        let tags: Vec<(String, String)> = variants
            .iter()
            .filter_map(|v| {
                let tag = v.get("properties")?.get(key)?.get("const")?;
                let d = v.get("description").and_then(Json::as_str).unwrap_or("");
                Some((tag.to_string(), d.to_string()))
            })
            .collect();
        (tags.len() == variants.len() && !tags.is_empty()).then_some(tags)
    }

    fn comment(&self, out: &mut String, prop: Option<&Json>) {
        let Some(prop) = prop else { return };
        if let Some(d) = self.description(prop) {
            for para in d.split("\n\n") {
                wrap(out, &para.replace('\n', " "));
            }
        }
        let choices = self.choices(prop);
        if choices.is_empty() {
            return;
        }
        if choices.iter().any(|(_, d)| d.is_some()) {
            out.push_str("# One of:\n");
            for (v, d) in &choices {
                match d {
                    Some(d) => wrap_indented(out, &format!("{v}: {}", d.replace('\n', " "))),
                    None => out.push_str(&format!("#   {v}\n")),
                }
            }
        } else {
            let list: Vec<&str> = choices.iter().map(|(v, _)| v.as_str()).collect();
            wrap(out, &format!("One of: {}.", list.join(", ")));
        }
    }

    /// Writes the plain keys of `table` (under the schema `s`), then each sub-table with its
    /// `[path]` header.
    fn table(&self, out: &mut String, path: &[&str], table: &Table, s: &Json) {
        for (key, value) in table {
            if matches!(value, Value::Table(_)) {
                continue;
            }
            if let Some(tags) = self.tag_choices(s, key) {
                out.push_str("# Which kind; the other keys of this table depend on it. One of:\n");
                for (v, d) in &tags {
                    wrap_indented(out, &format!("{v}: {}", d.replace('\n', " ")));
                }
            } else {
                self.comment(out, self.property(s, key));
            }
            out.push_str(&format!("{} = {}\n", toml_key(key), value));
        }
        for (key, value) in table {
            let Value::Table(sub) = value else { continue };
            let prop = self.property(s, key);
            let mut sub_path = path.to_vec();
            sub_path.push(key);
            out.push('\n');
            self.comment(out, prop);
            out.push_str(&format!(
                "[{}]\n",
                sub_path
                    .iter()
                    .map(|k| toml_key(k))
                    .collect::<Vec<_>>()
                    .join(".")
            ));
            let empty = Json::Null;
            self.table(out, &sub_path, sub, prop.unwrap_or(&empty));
        }
    }
}

fn toml_key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        k.to_string()
    } else {
        Value::String(k.to_string()).to_string()
    }
}

fn wrap_with(out: &mut String, text: &str, first: &str, rest: &str) {
    let mut line = String::from(first);
    let mut empty = true;
    for word in text.split_whitespace() {
        if !empty && line.len() + 1 + word.len() > WIDTH {
            out.push_str(&line);
            out.push('\n');
            line = String::from(rest);
            empty = true;
        }
        if !empty {
            line.push(' ');
        }
        line.push_str(word);
        empty = false;
    }
    if !empty {
        out.push_str(&line);
        out.push('\n');
    }
}

fn wrap(out: &mut String, text: &str) {
    wrap_with(out, text, "# ", "# ");
}

fn wrap_indented(out: &mut String, text: &str) {
    wrap_with(out, text, "#   ", "#     ");
}

/// The keys (dotted paths) and `[tables]` of a commented TOML text that have no comment line
/// right above them: for a test that every key of a configuration type is documented
/// (`undocumented_keys(&commented_toml::<MyConfig>("")?)` is empty).
pub fn undocumented_keys(text: &str) -> Vec<String> {
    let mut missing = Vec::new();
    let mut section = String::new();
    let mut prev_comment = false;
    for line in text.lines() {
        let t = line.trim();
        if let Some(h) = t.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            if !prev_comment {
                missing.push(format!("[{h}]"));
            }
            section = format!("{h}.");
            prev_comment = false;
        } else if t.starts_with('#') {
            prev_comment = true;
        } else if let Some((k, _)) = t.split_once(" = ") {
            if !prev_comment {
                missing.push(format!("{section}{k}"));
            }
            prev_comment = false;
        } else {
            prev_comment = false;
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sections' doc.
    #[derive(Debug, Default, PartialEq, Serialize, serde::Deserialize, JsonSchema)]
    #[serde(default)]
    struct Inner {
        /// How fast.
        speed: f64,
        /// The curve.
        curve: Curve,
    }

    /// A curve.
    #[derive(Debug, Default, PartialEq, Serialize, serde::Deserialize, JsonSchema)]
    #[serde(rename_all = "lowercase")]
    enum Curve {
        /// Straight down.
        #[default]
        Linear,
        /// Half a cosine.
        Cosine,
    }

    /// Top.
    #[derive(Debug, Default, PartialEq, Serialize, serde::Deserialize, JsonSchema)]
    #[serde(default)]
    struct Top {
        /// Steps to run, a sentence long enough to be wrapped over two lines of the comment block because it goes on and on.
        steps: u64,
        /// The inner part.
        inner: Inner,
        name: String,
    }

    #[test]
    fn keys_get_their_doc_comments_and_choices() {
        let text = commented_toml::<Top>("Title line").unwrap();
        assert!(text.starts_with("# Title line\n"), "{text}");
        assert!(text.contains("# Steps to run"), "{text}");
        assert!(text.lines().all(|l| l.len() <= WIDTH + 8), "{text}");
        assert!(text.contains("# The inner part.\n[inner]\n"), "{text}");
        assert!(text.contains("#   \"cosine\": Half a cosine."), "{text}");
        assert_eq!(undocumented_keys(&text), vec!["name".to_string()]);
        let back: Top = toml::from_str(&text).unwrap();
        assert_eq!(back, Top::default());
    }
}

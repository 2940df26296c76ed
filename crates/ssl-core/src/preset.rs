//! Named size presets for a configuration table, layered under its explicit keys.
//!
//! A table with presets (e.g. a modality's `[model]`) takes one more key, `preset`: the
//! preset's values come first and every key the table gives explicitly wins over them, so
//! `preset = "small"` with `depth = 6` is the small model with six layers. The layering is
//! done by the table's (de)serialisation, so it holds for any source (a TOML file, `--set`
//! overrides on top of the defaults, a stored `config.toml`) and needs nothing from the
//! caller:
//!
//! - deserialising reads `preset`, starts from [`Presets::preset`]'s values (`""` or
//!   absent: [`Presets::DEFAULT`]'s), overlays the keys given and deserialises the result; an
//!   unknown name is an error naming the valid ones;
//! - serialising writes `preset = "name"` for the first preset whose [`Presets::KEYS`] all
//!   equal the value's, and leaves those keys out (they follow from the name), else
//!   `preset = ""` and every key. So a preset's default serialises without its sizes, and a
//!   preset chosen over it (by a file or `--set model.preset=...`) is not overridden by
//!   them; serialising and deserialising again gives the same value.
//!
//! Use it on the field holding the table, with a schema type documenting `preset` (the
//! [`Presets::Name`] enum) beside the table's own keys:
//!
//! ```ignore
//! #[serde(
//!     serialize_with = "ssl_core::preset::serialize::<ViTConfig, _>",
//!     deserialize_with = "ssl_core::preset::deserialize::<ViTConfig, _>"
//! )]
//! #[schemars(with = "ModelSchema")]
//! pub model: ViTConfig,
//! ```

use serde::de::{DeserializeOwned, Error as _};
use serde::ser::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// The named presets of a configuration table (implemented by the table itself, or by a
/// marker type where the table's type is another crate's).
pub trait Presets {
    /// The table.
    type Table: Serialize + DeserializeOwned;
    /// The preset names (an enum serialised as its snake-case name).
    type Name: Serialize + DeserializeOwned + Copy + 'static;
    /// Every preset, in the order serialisation tries them.
    const ALL: &'static [Self::Name];
    /// The preset of the default configuration: the keys a table without a preset (`""` or
    /// none) leaves out come from it.
    const DEFAULT: Self::Name;
    /// The keys a preset sets, as dotted paths inside the table (`"tcn.depth"`).
    const KEYS: &'static [&'static str];
    /// The table a preset gives (its [`KEYS`](Presets::KEYS) from the preset, every other
    /// key at its default).
    fn preset(name: Self::Name) -> Self::Table;
}

/// The key naming the preset.
pub const PRESET_KEY: &str = "preset";

fn get<'a>(map: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut cur = map.get(parts.next()?)?;
    for p in parts {
        cur = cur.as_object()?.get(p)?;
    }
    Some(cur)
}

fn remove(map: &mut Map<String, Value>, path: &str) {
    match path.split_once('.') {
        None => {
            map.remove(path);
        }
        Some((head, rest)) => {
            if let Some(Value::Object(sub)) = map.get_mut(head) {
                remove(sub, rest);
            }
        }
    }
}

/// Overlays `over` onto `base`, table by table.
fn overlay(base: &mut Map<String, Value>, over: Map<String, Value>) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(Value::Object(b)), Value::Object(o)) => overlay(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn object<T: Serialize>(value: &T) -> Result<Map<String, Value>, String> {
    match serde_json::to_value(value).map_err(|e| e.to_string())? {
        Value::Object(m) => Ok(m),
        other => Err(format!(
            "a preset table must serialise as a table, not {other}"
        )),
    }
}

fn name_of<T: Presets>(name: T::Name) -> Result<String, String> {
    match serde_json::to_value(name).map_err(|e| e.to_string())? {
        Value::String(s) => Ok(s),
        other => Err(format!(
            "a preset name must serialise as a string, not {other}"
        )),
    }
}

/// The names of `T`'s presets, comma-separated (for messages).
pub fn names<T: Presets>() -> String {
    T::ALL
        .iter()
        .filter_map(|n| name_of::<T>(*n).ok())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The preset of `T` called `name`, or an error listing the valid names.
pub fn by_name<T: Presets>(name: &str) -> Result<T::Table, String> {
    serde_json::from_value::<T::Name>(Value::String(name.to_string()))
        .map(T::preset)
        .map_err(|_| format!("unknown preset `{name}`: one of {}", names::<T>()))
}

/// The first preset whose keys all equal `value`'s, and `value`'s table.
fn matching<T: Presets>(value: &T::Table) -> Result<(Option<String>, Map<String, Value>), String> {
    let map = object(value)?;
    for &name in T::ALL {
        let p = object(&T::preset(name))?;
        if T::KEYS.iter().all(|k| get(&map, k) == get(&p, k)) {
            return Ok((Some(name_of::<T>(name)?), map));
        }
    }
    Ok((None, map))
}

/// Serialises `value` as `preset = "name"` and the keys the preset does not set, or
/// `preset = ""` and every key when no preset matches (see the module documentation).
pub fn serialize<T: Presets, S: Serializer>(value: &T::Table, s: S) -> Result<S::Ok, S::Error> {
    let (name, mut map) = matching::<T>(value).map_err(S::Error::custom)?;
    if name.is_some() {
        for k in T::KEYS {
            remove(&mut map, k);
        }
    }
    map.insert(PRESET_KEY.into(), Value::String(name.unwrap_or_default()));
    map.serialize(s)
}

/// Deserialises a table whose `preset` key (if any) names the values under its explicit keys
/// (see the module documentation).
pub fn deserialize<'de, T: Presets, D: Deserializer<'de>>(d: D) -> Result<T::Table, D::Error> {
    let mut map = Map::<String, Value>::deserialize(d)?;
    let base = match map.remove(PRESET_KEY) {
        None => object(&T::preset(T::DEFAULT)),
        Some(Value::String(name)) if name.is_empty() => object(&T::preset(T::DEFAULT)),
        Some(Value::String(name)) => by_name::<T>(&name).and_then(|p| object(&p)),
        Some(other) => {
            return Err(D::Error::custom(format!(
                "{PRESET_KEY} = {other}: expected a preset's name ({}) or \"\"",
                names::<T>()
            )))
        }
    };
    let mut table = base.map_err(|e| D::Error::custom(format!("{PRESET_KEY}: {e}")))?;
    overlay(&mut table, map);
    serde_path_to_error::deserialize(Value::Object(table)).map_err(|e| {
        let path = e.path().to_string();
        D::Error::custom(format!("{path}: {}", e.into_inner()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        depth: usize,
        kernel: usize,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Model {
        dim: usize,
        eps: f64,
        inner: Inner,
    }

    impl Default for Model {
        fn default() -> Self {
            Model::preset(Size::Small)
        }
    }

    #[derive(Debug, Clone, Copy, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Size {
        Small,
        Large,
    }

    impl Presets for Model {
        type Table = Model;
        type Name = Size;
        const ALL: &'static [Size] = &[Size::Small, Size::Large];
        const DEFAULT: Size = Size::Small;
        const KEYS: &'static [&'static str] = &["dim", "inner.depth"];
        fn preset(name: Size) -> Self {
            let (dim, depth) = match name {
                Size::Small => (8, 1),
                Size::Large => (64, 6),
            };
            Model {
                dim,
                eps: 1e-6,
                inner: Inner { depth, kernel: 3 },
            }
        }
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Config {
        #[serde(
            serialize_with = "serialize::<Model, _>",
            deserialize_with = "deserialize::<Model, _>"
        )]
        model: Model,
    }

    /// The CLI's layering: the defaults' table, then the user's keys over it.
    fn layered(user: &str) -> Result<Config, toml::de::Error> {
        let mut table = toml::Table::try_from(Config::default()).unwrap();
        let user: toml::Table = toml::from_str(user).unwrap();
        for (k, v) in user {
            match (table.get_mut(&k), v) {
                (Some(toml::Value::Table(b)), toml::Value::Table(o)) => b.extend(o),
                (_, v) => {
                    table.insert(k, v);
                }
            }
        }
        toml::Value::Table(table).try_into()
    }

    #[test]
    fn a_preset_sets_its_keys_and_explicit_keys_win() {
        assert_eq!(layered("").unwrap().model, Model::preset(Size::Small));
        let large = layered("[model]\npreset = \"large\"").unwrap().model;
        assert_eq!(large, Model::preset(Size::Large));
        let six = layered("[model]\npreset = \"large\"\ndim = 16\ninner = { depth = 2 }")
            .unwrap()
            .model;
        assert_eq!((six.dim, six.inner.depth, six.inner.kernel), (16, 2, 3));
        // No preset: the keys as given, the others at their defaults.
        let none = layered("[model]\npreset = \"\"\ndim = 5").unwrap().model;
        assert_eq!((none.dim, none.inner.depth), (5, 1));
    }

    #[test]
    fn an_unknown_preset_names_the_valid_ones() {
        let err = layered("[model]\npreset = \"huge\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("huge") && err.contains("small, large"),
            "{err}"
        );
        let err = layered("[model]\ndimm = 3").unwrap_err().to_string();
        assert!(err.contains("dimm"), "{err}");
    }

    #[test]
    fn serialising_names_the_matching_preset_and_round_trips() {
        let text = toml::to_string(&Config::default()).unwrap();
        assert!(
            text.contains("preset = \"small\"") && !text.contains("dim"),
            "{text}"
        );
        for model in [
            Model::preset(Size::Large),
            Model {
                dim: 3,
                ..Model::default()
            },
        ] {
            let cfg = Config { model };
            let back: Config = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
            assert_eq!(back, cfg);
        }
    }
}

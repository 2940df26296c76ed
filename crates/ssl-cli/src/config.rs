//! TOML configuration: defaults, the user's file, `--set key=value` overrides, strict keys.

use serde::de::DeserializeOwned;
use serde::Serialize;
use toml::{Table, Value};

use crate::CliError;

/// The file a `pretrain` run starts from: the user's `--config`, else, with `--resume`, the
/// `config.toml` the run stored in `out` (so a resumed run keeps its settings).
pub fn base_file(
    config_file: Option<&std::path::Path>,
    out: &std::path::Path,
    resume: bool,
) -> Option<std::path::PathBuf> {
    let stored = out.join("config.toml");
    match config_file {
        None if resume && stored.is_file() => Some(stored),
        other => other.map(std::path::Path::to_path_buf),
    }
}

/// Writes an embedded default data file as `name` into a fresh temporary directory; returns
/// the directory guard (the file lives as long as it) and the file's path.
pub fn write_embedded(name: &str, bytes: &[u8]) -> Result<(tempfile::TempDir, String), CliError> {
    let dir = tempfile::tempdir().map_err(|e| CliError::Io {
        path: std::env::temp_dir(),
        source: e,
    })?;
    let p = dir.path().join(name);
    std::fs::write(&p, bytes).map_err(|e| CliError::Io {
        path: p.clone(),
        source: e,
    })?;
    Ok((dir, p.to_string_lossy().into_owned()))
}

/// Resolves a configuration: `defaults`, then the user's TOML file (if any), then each
/// `key=value` override (dotted keys, values in TOML syntax or bare strings). Unknown keys
/// are rejected with their full path.
pub fn resolve<T: Serialize + DeserializeOwned>(
    defaults: &T,
    file: Option<&std::path::Path>,
    overrides: &[String],
) -> Result<T, CliError> {
    let mut table = Table::try_from(defaults)
        .map_err(|e| CliError::Config(format!("serialising defaults: {e}")))?;
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| CliError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let user: Table = toml::from_str(&text)
            .map_err(|e| CliError::Config(format!("{}: {e}", path.display())))?;
        merge(&mut table, user);
    }
    for o in overrides {
        let (key, raw) = o.split_once('=').ok_or_else(|| {
            CliError::Config(format!(
                "--set {o}: expected key=value, e.g. train.max_steps=500"
            ))
        })?;
        set_path(&mut table, key.trim(), parse_value(raw.trim()))?;
    }
    serde_path_to_error::deserialize(Value::Table(table)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // The TOML deserializer appends "in `section`": the path already says it.
        let inner = inner.lines().next().unwrap_or_default().trim();
        CliError::Config(format!("config key `{path}`: {inner}"))
    })
}

fn parse_value(raw: &str) -> Value {
    match toml::from_str::<Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| Value::String(raw.to_string())),
        Err(_) => Value::String(raw.to_string()),
    }
}

fn merge(base: &mut Table, over: Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn set_path(table: &mut Table, key: &str, value: Value) -> Result<(), CliError> {
    let mut parts = key.split('.').peekable();
    let mut cur = table;
    while let Some(part) = parts.next() {
        if part.is_empty() {
            return Err(CliError::Config(format!("--set {key}: empty key segment")));
        }
        if parts.peek().is_none() {
            cur.insert(part.to_string(), value);
            return Ok(());
        }
        let next = cur
            .entry(part.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        cur = match next {
            Value::Table(t) => t,
            _ => {
                return Err(CliError::Config(format!(
                    "--set {key}: `{part}` is a value, not a section"
                )))
            }
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        steps: u64,
        name: String,
    }
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        train: Inner,
    }

    #[test]
    fn overrides_and_unknown_keys() {
        let d = Outer {
            train: Inner {
                steps: 1,
                name: "a".into(),
            },
        };
        let r: Outer =
            resolve(&d, None, &["train.steps=5".into(), "train.name=b c".into()]).unwrap();
        assert_eq!(
            r.train,
            Inner {
                steps: 5,
                name: "b c".into()
            }
        );
        let err = resolve::<Outer>(&d, None, &["train.stepz=5".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("train") && err.contains("stepz"), "{err}");
        let err = resolve::<Outer>(&d, None, &["train.steps=x".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("train.steps"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[train]\nsteps = 9\nbogus = 1\n").unwrap();
        let err = resolve::<Outer>(&d, Some(&p), &[]).unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
    }
}

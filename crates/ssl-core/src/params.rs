//! Named trainable parameters: creation with seeded initialisation, weight-decay groups,
//! safetensors save and load under the model's own key names.
//!
//! candle's `VarMap` iterates a `HashMap` and initialises from an unseedable generator; the
//! [`ParamStore`] keeps variables in a `BTreeMap` (sorted by name, so optimizer state,
//! all-reduce buffers and checkpoints have one order) and initialises them from an [`SslRng`].

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Shape, Tensor, Var};

use crate::{CoreError, Result, SslRng};

/// How a parameter is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
    /// Normal with mean 0 and the given standard deviation (BERT uses 0.02).
    Normal(f64),
    /// Uniform in `[-bound, bound]`.
    Uniform(f64),
    /// Xavier/Glorot uniform for a `(fan_out, fan_in)` weight (ViT / MAE linear layers).
    XavierUniform,
}

/// A trainable parameter and its weight-decay group.
#[derive(Debug, Clone)]
pub struct Param {
    /// The variable.
    pub var: Var,
    /// Whether AdamW's decoupled weight decay applies to it.
    pub decay: bool,
}

/// Trainable parameters by name, sorted.
#[derive(Clone, Debug)]
pub struct ParamStore {
    inner: Arc<Mutex<BTreeMap<String, Param>>>,
    device: Device,
    dtype: DType,
}

fn lock(m: &Mutex<BTreeMap<String, Param>>) -> MutexGuard<'_, BTreeMap<String, Param>> {
    // A poisoned lock only means another thread panicked mid-insert; the map is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ParamStore {
    /// An empty store whose parameters live on `device`.
    pub fn new(device: &Device) -> Self {
        ParamStore {
            inner: Arc::new(Mutex::new(BTreeMap::new())),
            device: device.clone(),
            dtype: DType::F32,
        }
    }

    /// An empty store whose parameters live on `device` with element type `dtype` (f32 is
    /// what training uses; f64 serves as a numerical reference in tests). Initial values are
    /// drawn in f32 and converted, so the same seed gives the same values in every dtype.
    pub fn with_dtype(device: &Device, dtype: DType) -> Self {
        ParamStore {
            dtype,
            ..ParamStore::new(device)
        }
    }

    /// The device of the parameters.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// True when `self` and `other` are handles on the same parameters (clones of one store),
    /// as the parts of a [`crate::ComposedTask`] must be.
    pub fn same_store(&self, other: &ParamStore) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// A builder that creates parameters in this store, initialised from `seed`.
    pub fn builder(&self, seed: u64) -> ParamBuilder {
        ParamBuilder {
            store: self.clone(),
            prefix: String::new(),
            rng: Arc::new(Mutex::new(SslRng::derived(seed, "init"))),
        }
    }

    /// All parameters sorted by name.
    pub fn params(&self) -> Vec<(String, Param)> {
        lock(&self.inner)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// All variables sorted by name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        lock(&self.inner)
            .iter()
            .map(|(k, v)| (k.clone(), v.var.clone()))
            .collect()
    }

    /// The variable called `name`.
    pub fn get(&self, name: &str) -> Option<Var> {
        lock(&self.inner).get(name).map(|p| p.var.clone())
    }

    /// Number of parameters (scalars).
    pub fn num_elements(&self) -> usize {
        lock(&self.inner).values().map(|p| p.var.elem_count()).sum()
    }

    /// Number of named variables.
    pub fn len(&self) -> usize {
        lock(&self.inner).len()
    }

    /// True when the store holds no variables.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Current values by name (detached copies sharing storage).
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        Ok(lock(&self.inner)
            .iter()
            .map(|(k, v)| (k.clone(), v.var.as_tensor().detach()))
            .collect())
    }

    /// Sets every parameter from `values` (all names must be present with matching shapes).
    pub fn set_all(&self, values: &HashMap<String, Tensor>, source: &Path) -> Result<()> {
        let report = self.load_from(values, source)?;
        if let Some(name) = report.missing.first() {
            return Err(CoreError::checkpoint(
                source,
                format!(
                    "parameter `{name}` is missing ({} of {} missing)",
                    report.missing.len(),
                    self.len()
                ),
            ));
        }
        Ok(())
    }

    /// Sets the parameters found in `values`; returns which were missing and which values had
    /// no parameter. A shape mismatch is an error naming the key.
    pub fn load_from(&self, values: &HashMap<String, Tensor>, source: &Path) -> Result<LoadReport> {
        let map = lock(&self.inner);
        let mut report = LoadReport::default();
        for (name, param) in map.iter() {
            match values.get(name) {
                None => report.missing.push(name.clone()),
                Some(t) => {
                    if t.dims() != param.var.dims() {
                        return Err(CoreError::checkpoint(
                            source,
                            format!(
                                "parameter `{name}` has shape {:?} in the file but {:?} in the model",
                                t.dims(),
                                param.var.dims()
                            ),
                        ));
                    }
                    let t = t.to_dtype(param.var.dtype())?.to_device(&self.device)?;
                    // x * 0 is 0 for every finite x and NaN for NaN and infinity.
                    let sum = t.affine(0.0, 0.0)?.sum_all()?.to_dtype(DType::F64)?;
                    if !sum.to_scalar::<f64>()?.is_finite() {
                        return Err(CoreError::checkpoint(
                            source,
                            format!("parameter `{name}` holds non-finite values (NaN or infinity)"),
                        ));
                    }
                    param.var.set(&t)?;
                    report.loaded.push(name.clone());
                }
            }
        }
        report.unexpected = values
            .keys()
            .filter(|k| !map.contains_key(*k))
            .cloned()
            .collect();
        report.unexpected.sort();
        Ok(report)
    }

    /// Writes all parameters to a safetensors file under their own names, with the header
    /// metadata `{"format": "pt"}` (see [`write_safetensors`]).
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        write_safetensors(&self.tensors()?, path)
    }

    /// Loads every parameter from a safetensors file; missing keys or shape mismatches are
    /// errors naming the key. Extra keys in the file are ignored and returned.
    pub fn load_safetensors(&self, path: &Path) -> Result<LoadReport> {
        let values = read_safetensors(path, &self.device)?;
        let report = self.load_from(&values, path)?;
        if let Some(name) = report.missing.first() {
            return Err(CoreError::checkpoint(
                path,
                format!(
                    "parameter `{name}` is not in the file ({} of {} missing)",
                    report.missing.len(),
                    self.len()
                ),
            ));
        }
        Ok(report)
    }

    /// The first parameter holding NaN or infinity, if any.
    pub fn first_non_finite(&self) -> Result<Option<String>> {
        for (name, var) in self.vars() {
            let s = var.as_tensor().sqr()?.sum_all()?.to_dtype(DType::F64)?;
            if !s.to_scalar::<f64>()?.is_finite() {
                return Ok(Some(name));
            }
        }
        Ok(None)
    }
}

/// Reads a safetensors file into tensors on `device`.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(CoreError::checkpoint(path, "file not found"));
    }
    candle_core::safetensors::load(path, device)
        .map_err(|e| CoreError::checkpoint(path, format!("reading safetensors: {e}")))
}

/// What [`ParamStore::load_from`] found.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LoadReport {
    /// Parameters that were set.
    pub loaded: Vec<String>,
    /// Parameters with no value in the source.
    pub missing: Vec<String>,
    /// Values in the source with no parameter.
    pub unexpected: Vec<String>,
}

/// Creates parameters under a name prefix, as candle-nn's `VarBuilder` does, but seeded.
///
/// Names are joined with `.` so they equal Hugging Face checkpoint keys.
#[derive(Clone)]
pub struct ParamBuilder {
    store: ParamStore,
    prefix: String,
    rng: Arc<Mutex<SslRng>>,
}

impl ParamBuilder {
    /// A builder for names under `self.prefix + "." + name`.
    pub fn pp(&self, name: impl AsRef<str>) -> ParamBuilder {
        ParamBuilder {
            store: self.store.clone(),
            prefix: self.path(name.as_ref()),
            rng: self.rng.clone(),
        }
    }

    /// The full name of `name` under this builder's prefix.
    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// The device parameters are created on.
    pub fn device(&self) -> &Device {
        self.store.device()
    }

    /// The store being filled.
    pub fn store(&self) -> &ParamStore {
        &self.store
    }

    /// Creates (or returns the existing) parameter `name`. Weight decay applies to tensors of
    /// rank 2 and above; biases and 1-D norm weights are spared, as in BERT, MAE and timm.
    pub fn get(&self, name: &str, shape: impl Into<Shape>, init: Init) -> Result<Tensor> {
        let shape = shape.into();
        let decay = shape.rank() >= 2;
        self.get_with_decay(name, shape, init, decay)
    }

    /// As [`ParamBuilder::get`], with the weight-decay group given explicitly (e.g. no decay
    /// for class tokens, mask tokens and position embeddings).
    pub fn get_with_decay(
        &self,
        name: &str,
        shape: impl Into<Shape>,
        init: Init,
        decay: bool,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let full = self.path(name);
        let mut map = lock(&self.store.inner);
        if let Some(p) = map.get(&full) {
            if p.var.shape() != &shape {
                return Err(CoreError::InvalidInput(format!(
                    "parameter `{full}` requested with shape {shape:?} but exists with {:?}",
                    p.var.shape()
                )));
            }
            return Ok(p.var.as_tensor().clone());
        }
        let n = shape.elem_count();
        let values = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            match init {
                Init::Zeros => vec![0f32; n],
                Init::Ones => vec![1f32; n],
                Init::Normal(std) => rng.normal_vec(n, 0.0, std as f32),
                Init::Uniform(b) => rng.uniform_vec(n, -b as f32, b as f32),
                Init::XavierUniform => {
                    let dims = shape.dims();
                    let (fan_out, fan_in) = match dims {
                        [o, i] => (*o, *i),
                        _ => (n, n),
                    };
                    let b = (6.0 / (fan_in + fan_out) as f64).sqrt() as f32;
                    rng.uniform_vec(n, -b, b)
                }
            }
        };
        let t = Tensor::from_vec(values, shape, self.store.device())?.to_dtype(self.store.dtype)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        map.insert(full, Param { var, decay });
        Ok(out)
    }
}

/// Writes `tensors` to a safetensors file (names sorted, as every reader expects) with the
/// header metadata `{"format": "pt"}`, which transformers' loaders require of the files they
/// read (older versions refuse a file without it). The file gets the process's ordinary
/// creation mode (0644 under the usual umask; `safetensors::serialize_to_file`, which candle's
/// `save` calls, creates it 0600).
pub fn write_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let mut sorted: Vec<(&String, &Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(sorted, Some(metadata))
        .map_err(|e| CoreError::checkpoint(path, format!("serialising safetensors: {e}")))?;
    std::fs::write(path, bytes).map_err(|e| CoreError::io("writing", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_values_and_sorted_names() {
        let mk = |seed| {
            let store = ParamStore::new(&Device::Cpu);
            let pb = store.builder(seed);
            pb.pp("b")
                .get("weight", (3, 4), Init::Normal(0.02))
                .unwrap();
            pb.pp("a").get("bias", 4, Init::Zeros).unwrap();
            store
        };
        let (s1, s2, s3) = (mk(1), mk(1), mk(2));
        let names: Vec<_> = s1.vars().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["a.bias", "b.weight"]);
        let w = |s: &ParamStore| {
            s.get("b.weight")
                .unwrap()
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(w(&s1), w(&s2));
        assert_ne!(w(&s1), w(&s3));
        let groups: Vec<_> = s1.params().into_iter().map(|(_, p)| p.decay).collect();
        assert_eq!(groups, [false, true]);
    }

    #[test]
    fn safetensors_round_trip_and_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let store = ParamStore::new(&Device::Cpu);
        store
            .builder(0)
            .get("w", (2, 2), Init::Normal(1.0))
            .unwrap();
        store.save_safetensors(&path).unwrap();
        // transformers reads the header's metadata: {"format": "pt"}.
        let bytes = std::fs::read(&path).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let format = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("format").cloned());
        assert_eq!(format.as_deref(), Some("pt"));
        // An ordinary file mode: that of a file written with std::fs::write beside it.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let plain = dir.path().join("plain");
            std::fs::write(&plain, b"x").unwrap();
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&path), mode(&plain));
        }
        let other = ParamStore::new(&Device::Cpu);
        other.builder(9).get("w", (2, 2), Init::Zeros).unwrap();
        other.load_safetensors(&path).unwrap();
        assert_eq!(
            other
                .get("w")
                .unwrap()
                .as_tensor()
                .to_vec2::<f32>()
                .unwrap(),
            store
                .get("w")
                .unwrap()
                .as_tensor()
                .to_vec2::<f32>()
                .unwrap()
        );
        let wrong = ParamStore::new(&Device::Cpu);
        wrong.builder(0).get("w", (3, 2), Init::Zeros).unwrap();
        let err = wrong.load_safetensors(&path).unwrap_err().to_string();
        assert!(err.contains("`w`") && err.contains("[3, 2]"), "{err}");
        let missing = ParamStore::new(&Device::Cpu);
        missing.builder(0).get("v", 2, Init::Zeros).unwrap();
        let err = missing.load_safetensors(&path).unwrap_err().to_string();
        assert!(err.contains("`v`"), "{err}");
    }

    #[test]
    fn non_finite_weights_in_a_file_are_refused_naming_the_file_and_parameter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let store = ParamStore::new(&Device::Cpu);
        store.builder(0).get("w", (2, 2), Init::Zeros).unwrap();
        let nan = Tensor::new(&[[0f32, f32::NAN], [1.0, 2.0]], &Device::Cpu).unwrap();
        store.get("w").unwrap().set(&nan).unwrap();
        store.save_safetensors(&path).unwrap();
        let other = ParamStore::new(&Device::Cpu);
        other.builder(1).get("w", (2, 2), Init::Zeros).unwrap();
        let err = other.load_safetensors(&path).unwrap_err().to_string();
        assert!(
            err.contains("m.safetensors") && err.contains("`w`") && err.contains("non-finite"),
            "{err}"
        );
    }
}

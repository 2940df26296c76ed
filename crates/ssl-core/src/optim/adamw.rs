//! AdamW with parameter groups and saveable state.
//!
//! candle-nn's AdamW keeps its moments private and decays every parameter; this one spares
//! the parameters marked `decay = false` (biases, norm weights, tokens) and saves its moments
//! under `m.{name}` / `v.{name}` so a resumed run continues exactly. The update follows
//! PyTorch's `torch.optim.AdamW` (decoupled decay `p -= lr * wd * p`, bias-corrected moments).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::params::read_safetensors;
use crate::{CoreError, ParamStore, Result};

/// AdamW hyper-parameters (learning rate comes per step from the schedule).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay for the decayed group.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
}

/// AdamW over the variables of a [`ParamStore`], in name order.
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    t: u64,
}

impl AdamW {
    /// An optimizer for every parameter of `store`, with zero moments.
    pub fn new(store: &ParamStore, cfg: AdamWConfig) -> Result<Self> {
        let mut slots = Vec::new();
        for (name, p) in store.params() {
            let m = p.var.as_tensor().zeros_like()?.detach();
            let v = m.clone();
            slots.push(Slot {
                name,
                var: p.var,
                decay: p.decay,
                m,
                v,
            });
        }
        Ok(AdamW { cfg, slots, t: 0 })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Number of updates applied so far.
    pub fn step_count(&self) -> u64 {
        self.t
    }

    /// Parameter names in the order gradients are expected.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| s.name.as_str())
    }

    /// The variables, in [`AdamW::names`] order.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.slots.iter().map(|s| &s.var)
    }

    /// Applies one update with learning rate `lr`; `grads[i]` belongs to the i-th variable
    /// (`None`: the parameter got no gradient this step and is left untouched, moments too).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        if grads.len() != self.slots.len() {
            return Err(CoreError::InvalidInput(format!(
                "optimizer got {} gradients for {} parameters",
                grads.len(),
                self.slots.len()
            )));
        }
        self.t += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let t = i32::try_from(self.t).unwrap_or(i32::MAX);
        let scale_m = 1.0 / (1.0 - b1.powi(t));
        let scale_v = 1.0 / (1.0 - b2.powi(t));
        for (slot, g) in self.slots.iter_mut().zip(grads) {
            let Some(g) = g else { continue };
            let g = g.to_dtype(slot.var.dtype())?;
            let m = ((&slot.m * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&slot.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let m_hat = (&m * scale_m)?;
            let v_hat = (&v * scale_v)?;
            let wd = if slot.decay {
                self.cfg.weight_decay
            } else {
                0.0
            };
            let theta = (slot.var.as_tensor() * (1.0 - lr * wd))?;
            let update = (m_hat / (v_hat.sqrt()? + self.cfg.eps)?)?;
            slot.var.set(&(theta - (update * lr)?)?)?;
            slot.m = m;
            slot.v = v;
        }
        Ok(())
    }

    /// The moments as tensors named `m.{param}` and `v.{param}`.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for s in &self.slots {
            out.insert(format!("m.{}", s.name), s.m.clone());
            out.insert(format!("v.{}", s.name), s.v.clone());
        }
        out
    }

    /// Writes the moments to a safetensors file (the step count lives in the trainer state).
    pub fn save(&self, path: &Path) -> Result<()> {
        candle_core::safetensors::save(&self.state_tensors(), path)
            .map_err(|e| CoreError::checkpoint(path, format!("writing optimizer state: {e}")))
    }

    /// Restores moments from [`AdamW::save`]'s file and the step count `t`.
    pub fn load(&mut self, path: &Path, t: u64) -> Result<()> {
        let device = self
            .slots
            .first()
            .map(|s| s.var.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let values = read_safetensors(path, &device)?;
        for s in &mut self.slots {
            for (key, dst) in [
                (format!("m.{}", s.name), &mut s.m),
                (format!("v.{}", s.name), &mut s.v),
            ] {
                let src = values.get(&key).ok_or_else(|| {
                    CoreError::checkpoint(path, format!("optimizer moment `{key}` is missing"))
                })?;
                if src.dims() != s.var.dims() {
                    return Err(CoreError::checkpoint(
                        path,
                        format!(
                            "optimizer moment `{key}` has shape {:?}, parameter has {:?}",
                            src.dims(),
                            s.var.dims()
                        ),
                    ));
                }
                *dst = src.to_dtype(s.var.dtype())?;
            }
        }
        self.t = t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Init, ParamStore};
    use candle_core::{Device, D};
    use candle_nn::Optimizer;

    fn problem(store: &ParamStore) -> (Tensor, Tensor) {
        let pb = store.builder(3);
        let w = pb.get("w", (3, 4), Init::Normal(0.5)).unwrap();
        let b = pb.get("b", 3, Init::Normal(0.5)).unwrap();
        (w, b)
    }

    fn loss(w: &Tensor, b: &Tensor, step: usize) -> Tensor {
        let dev = Device::Cpu;
        let x: Vec<f32> = (0..20)
            .map(|i| (((i + step) * 13 % 7) as f32) / 3.0 - 1.0)
            .collect();
        let x = Tensor::from_vec(x, (5, 4), &dev).unwrap();
        let y = x.matmul(&w.t().unwrap()).unwrap().broadcast_add(b).unwrap();
        (y - 0.7)
            .unwrap()
            .sqr()
            .unwrap()
            .sum(D::Minus1)
            .unwrap()
            .mean_all()
            .unwrap()
    }

    #[test]
    fn matches_candle_nn_adamw_when_every_parameter_decays() {
        let ours = ParamStore::new(&Device::Cpu);
        let (w1, b1) = problem(&ours);
        let theirs = ParamStore::new(&Device::Cpu);
        let (w2, b2) = problem(&theirs);
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        // Our groups spare the bias; mark everything decayed to compare with candle-nn.
        let mut opt = AdamW::new(&ours, cfg).unwrap();
        for s in &mut opt.slots {
            s.decay = true;
        }
        let params = candle_nn::ParamsAdamW {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let vars: Vec<Var> = theirs.vars().into_iter().map(|(_, v)| v).collect();
        let mut reference = candle_nn::AdamW::new(vars, params).unwrap();
        for step in 0..50 {
            let l1 = loss(&w1, &b1, step);
            let g = l1.backward().unwrap();
            let grads: Vec<Option<Tensor>> =
                opt.vars().map(|v| g.get(v.as_tensor()).cloned()).collect();
            opt.step(&grads, 0.01).unwrap();
            let l2 = loss(&w2, &b2, step);
            reference.backward_step(&l2).unwrap();
        }
        for (name, v1) in ours.vars() {
            let a = v1
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let b = theirs
                .get(&name)
                .unwrap()
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() < 1e-6, "{name}: {p} vs {q}");
            }
        }
    }

    #[test]
    fn no_decay_group_is_spared() {
        let store = ParamStore::new(&Device::Cpu);
        let pb = store.builder(0);
        pb.get("w", (2, 2), Init::Ones).unwrap();
        pb.get("b", 2, Init::Ones).unwrap();
        let mut opt = AdamW::new(
            &store,
            AdamWConfig {
                weight_decay: 0.5,
                ..Default::default()
            },
        )
        .unwrap();
        let zeros = Some(Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap());
        let zeros2 = Some(Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap());
        // Name order: "b", "w".
        opt.step(&[zeros, zeros2], 0.1).unwrap();
        assert_eq!(
            store
                .get("b")
                .unwrap()
                .as_tensor()
                .to_vec1::<f32>()
                .unwrap(),
            [1.0, 1.0]
        );
        assert_eq!(
            store
                .get("w")
                .unwrap()
                .as_tensor()
                .to_vec2::<f32>()
                .unwrap(),
            [[0.95, 0.95], [0.95, 0.95]]
        );
    }

    #[test]
    fn state_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = ParamStore::new(&Device::Cpu);
        let (w, b) = problem(&store);
        let mut opt = AdamW::new(&store, AdamWConfig::default()).unwrap();
        for step in 0..3 {
            let g = loss(&w, &b, step).backward().unwrap();
            let grads: Vec<_> = opt.vars().map(|v| g.get(v.as_tensor()).cloned()).collect();
            opt.step(&grads, 0.01).unwrap();
        }
        let path = dir.path().join("opt.safetensors");
        opt.save(&path).unwrap();
        let mut other = AdamW::new(&store, AdamWConfig::default()).unwrap();
        other.load(&path, opt.step_count()).unwrap();
        let (a, c) = (opt.state_tensors(), other.state_tensors());
        for (k, t) in a {
            assert_eq!(
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                c[&k].flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
        assert_eq!(other.step_count(), 3);
    }
}

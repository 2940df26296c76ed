//! AdamW with parameter groups and saveable state.
//!
//! candle-nn's AdamW keeps its moments private and decays every parameter; this one spares
//! the parameters marked `decay = false` (biases, norm weights, tokens) and saves its moments
//! under `m.{name}` / `v.{name}` so a resumed run continues exactly. The update follows
//! PyTorch's `torch.optim.AdamW` (decoupled decay `p -= lr * wd * p`, bias-corrected moments).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use ssl_kernels::{adamw, AdamWCoeffs};

use crate::nn::ops::cpu_f32_view;
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

/// The two moments of one parameter.
enum Moments {
    /// Any device and dtype: tensors, updated with candle ops.
    Tensors { m: Tensor, v: Tensor },
    /// f32 on the CPU: host vectors, updated in place with the parameter in one pass.
    Host { m: Vec<f32>, v: Vec<f32> },
}

struct Slot {
    name: String,
    var: Var,
    decay: bool,
    /// The learning rate's factor for this parameter (layer-wise decay; 1 by default).
    lr_scale: f64,
    moments: Moments,
}

/// The in-place CPU update of one parameter (see [`adamw`]).
struct HostUpdate<'a> {
    moments: Mutex<(&'a mut [f32], &'a mut [f32])>,
    grad: &'a [f32],
    coeffs: AdamWCoeffs,
}

impl InplaceOp1 for HostUpdate<'_> {
    fn name(&self) -> &'static str {
        "adamw-host-update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(all) = storage else {
            candle_core::bail!("AdamW host update: parameter is not f32");
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("AdamW host update: parameter is not contiguous");
        };
        let theta = &mut all[a..b];
        let mut guard = self.moments.lock().unwrap_or_else(PoisonError::into_inner);
        let (m, v) = &mut *guard;
        if theta.len() != m.len() || theta.len() != self.grad.len() {
            candle_core::bail!("AdamW host update: parameter, moment and gradient sizes differ");
        }
        const CHUNK: usize = 1 << 15;
        let c = self.coeffs;
        theta
            .par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(self.grad.par_chunks(CHUNK))
            .for_each(|(((t, m), v), g)| adamw(t, m, v, g, c));
        Ok(())
    }
}

impl Slot {
    /// Updates the parameter and moments in place on the CPU.
    fn host_step(&mut self, g: &Tensor, coeffs: AdamWCoeffs) -> Result<()> {
        let Moments::Host { m, v } = &mut self.moments else {
            return Err(CoreError::InvalidInput(
                "host step on device moments".into(),
            ));
        };
        let g = g.to_dtype(DType::F32)?.contiguous()?;
        let (storage, layout) = g.storage_and_layout();
        let Some(grad) = cpu_f32_view(&storage, layout) else {
            return Err(CoreError::InvalidInput(format!(
                "gradient of `{}` is not an f32 CPU tensor",
                self.name
            )));
        };
        if grad.len() != m.len() {
            return Err(CoreError::InvalidInput(format!(
                "gradient of `{}` has {} elements, the parameter {}",
                self.name,
                grad.len(),
                m.len()
            )));
        }
        let op = HostUpdate {
            moments: Mutex::new((m.as_mut_slice(), v.as_mut_slice())),
            grad,
            coeffs,
        };
        self.var.as_tensor().inplace_op1(&op)?;
        Ok(())
    }
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
            let t = p.var.as_tensor();
            let moments = if matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32 {
                let n = t.elem_count();
                Moments::Host {
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                }
            } else {
                Moments::Tensors {
                    m: t.zeros_like()?.detach(),
                    v: t.zeros_like()?.detach(),
                }
            };
            slots.push(Slot {
                name,
                var: p.var,
                decay: p.decay,
                lr_scale: 1.0,
                moments,
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

    /// Sets each parameter's learning-rate factor to `scale(name)` (layer-wise learning-rate
    /// decay, as the fine-tuning recipes of MAE and BEiT: the step's rate times the factor,
    /// weight decay included, as a PyTorch parameter group's `lr_scale`). A factor of 0 leaves
    /// the parameter as it is. Errors on a negative or non-finite factor, naming the parameter.
    pub fn set_lr_scales(&mut self, scale: impl Fn(&str) -> f64) -> Result<()> {
        for slot in &mut self.slots {
            let s = scale(&slot.name);
            if !(s.is_finite() && s >= 0.0) {
                return Err(CoreError::InvalidInput(format!(
                    "learning-rate factor {s} for `{}`: must be a number >= 0",
                    slot.name
                )));
            }
            slot.lr_scale = s;
        }
        Ok(())
    }

    /// The variables, in [`AdamW::names`] order.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.slots.iter().map(|s| &s.var)
    }

    /// Applies one update with learning rate `lr`; `grads[i]` belongs to the i-th variable
    /// (`None`: the parameter got no gradient this step and is left untouched, moments too).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.step_scaled(grads, lr, 1.0)
    }

    /// [`AdamW::step`] on the gradients times `grad_scale`, which the f32 CPU update applies
    /// as it reads each gradient: the division by the loss weight and the clipping factor
    /// ([`crate::optim::clip_scale`]) cost no pass over the gradients of their own. For f32
    /// parameters the result is the step on `grads` scaled by candle in f32 first, bit for bit
    /// (other dtypes scale after the cast to the parameter's dtype).
    pub fn step_scaled(
        &mut self,
        grads: &[Option<Tensor>],
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        if grads.len() != self.slots.len() {
            return Err(CoreError::InvalidInput(format!(
                "optimizer got {} gradients for {} parameters",
                grads.len(),
                self.slots.len()
            )));
        }
        // Every gradient checked before any state changes: the parameters below update in
        // parallel, so a refusal half way would leave an arbitrary subset updated.
        for (slot, g) in self.slots.iter().zip(grads) {
            let Some(g) = g else { continue };
            if g.elem_count() != slot.var.elem_count() || !g.device().same_device(slot.var.device())
            {
                return Err(CoreError::InvalidInput(format!(
                    "gradient of `{}` has {} elements on {:?}, the parameter {} on {:?}",
                    slot.name,
                    g.elem_count(),
                    g.device().location(),
                    slot.var.elem_count(),
                    slot.var.device().location()
                )));
            }
        }
        self.t += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let t = i32::try_from(self.t).unwrap_or(i32::MAX);
        let scale_m = 1.0 / (1.0 - b1.powi(t));
        let scale_v = 1.0 / (1.0 - b2.powi(t));
        let base_lr = lr;
        let cfg = self.cfg;
        // The update of each parameter: its learning rate and decay, or `None` to skip it.
        let plan = |slot: &Slot, g: &Option<Tensor>| -> Option<(f64, f64)> {
            g.as_ref()?;
            if slot.lr_scale == 0.0 {
                return None;
            }
            let wd = if slot.decay { cfg.weight_decay } else { 0.0 };
            Some((base_lr * slot.lr_scale, wd))
        };
        let coeffs = |lr: f64, wd: f64| AdamWCoeffs {
            b1: b1 as f32,
            one_minus_b1: (1.0 - b1) as f32,
            b2: b2 as f32,
            one_minus_b2: (1.0 - b2) as f32,
            scale_m: scale_m as f32,
            scale_v: scale_v as f32,
            decay: (1.0 - lr * wd) as f32,
            lr: lr as f32,
            eps: cfg.eps as f32,
            grad_scale: grad_scale as f32,
        };
        // f32 CPU parameters: each updated in place in one pass, the parameters in parallel
        // (one parallel region for all of them, not one per parameter: a model of many small
        // tensors, MAE's 128, spent more in the per-tensor hand-offs than in the passes).
        self.slots
            .par_iter_mut()
            .zip(grads.par_iter())
            .filter(|(slot, _)| matches!(slot.moments, Moments::Host { .. }))
            .try_for_each(|(slot, g)| match (plan(slot, g), g) {
                (Some((lr, wd)), Some(g)) => slot.host_step(g, coeffs(lr, wd)),
                _ => Ok(()),
            })?;
        for (slot, g) in self.slots.iter_mut().zip(grads) {
            let (Some((lr, wd)), Some(g)) = (plan(slot, g), g) else {
                continue;
            };
            let Moments::Tensors { m, v } = &mut slot.moments else {
                continue;
            };
            // The same arithmetic as the host pass, with candle ops (any device and dtype).
            let mut g = g.to_dtype(slot.var.dtype())?;
            if grad_scale != 1.0 {
                g = (g * grad_scale)?;
            }
            let m1 = ((&*m * b1)? + (&g * (1.0 - b1))?)?;
            let v1 = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let m_hat = (&m1 * scale_m)?;
            let v_hat = (&v1 * scale_v)?;
            let theta = (slot.var.as_tensor() * (1.0 - lr * wd))?;
            let update = (m_hat / (v_hat.sqrt()? + cfg.eps)?)?;
            slot.var.set(&(theta - (update * lr)?)?)?;
            *m = m1;
            *v = v1;
        }
        Ok(())
    }

    /// The moments as tensors named `m.{param}` and `v.{param}`.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for s in &self.slots {
            let (m, v) = match &s.moments {
                Moments::Tensors { m, v } => (m.clone(), v.clone()),
                Moments::Host { m, v } => {
                    let t = s.var.as_tensor();
                    let mk = |x: &Vec<f32>| Tensor::from_slice(x, t.shape(), t.device());
                    match (mk(m), mk(v)) {
                        (Ok(m), Ok(v)) => (m, v),
                        // Same length as the parameter by construction; unreachable.
                        _ => continue,
                    }
                }
            };
            out.insert(format!("m.{}", s.name), m);
            out.insert(format!("v.{}", s.name), v);
        }
        out
    }

    /// Writes the moments to a safetensors file (the step count lives in the trainer state).
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::params::write_safetensors(&self.state_tensors(), path)
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
            let dtype = s.var.dtype();
            let (dst_m, dst_v) = match &mut s.moments {
                Moments::Tensors { m, v } => (Dst::Tensor(m), Dst::Tensor(v)),
                Moments::Host { m, v } => (Dst::Host(m), Dst::Host(v)),
            };
            for (key, dst) in [
                (format!("m.{}", s.name), dst_m),
                (format!("v.{}", s.name), dst_v),
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
                match dst {
                    Dst::Tensor(t) => *t = src.to_dtype(dtype)?,
                    Dst::Host(h) => *h = src.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                }
            }
        }
        self.t = t;
        Ok(())
    }
}

/// Where a loaded moment goes.
enum Dst<'a> {
    Tensor(&'a mut Tensor),
    Host(&'a mut Vec<f32>),
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
        for (name, a, b) in paired_values(&ours, &theirs) {
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() < 1e-6, "{name}: {p} vs {q}");
            }
        }
    }

    /// Each parameter of `a` by name, with its values in `a` and in `b`.
    fn paired_values(a: &ParamStore, b: &ParamStore) -> Vec<(String, Vec<f32>, Vec<f32>)> {
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        a.vars()
            .into_iter()
            .map(|(name, v)| {
                let theirs = values(b.get(&name).unwrap().as_tensor());
                (name, values(v.as_tensor()), theirs)
            })
            .collect()
    }

    /// Puts every parameter of `opt` on the composite candle-op update (fresh moments).
    fn use_tensor_moments(opt: &mut AdamW) {
        for s in &mut opt.slots {
            let t = s.var.as_tensor();
            s.moments = Moments::Tensors {
                m: t.zeros_like().unwrap(),
                v: t.zeros_like().unwrap(),
            };
        }
    }

    /// The one-pass CPU update and the composite candle-op update give the same parameters.
    #[test]
    fn host_update_equals_tensor_update() {
        let a = ParamStore::new(&Device::Cpu);
        let (w1, b1) = problem(&a);
        let b = ParamStore::new(&Device::Cpu);
        let (w2, b2) = problem(&b);
        let mut host = AdamW::new(&a, AdamWConfig::default()).unwrap();
        let mut tensors = AdamW::new(&b, AdamWConfig::default()).unwrap();
        assert!(host
            .slots
            .iter()
            .all(|s| matches!(s.moments, Moments::Host { .. })));
        use_tensor_moments(&mut tensors);
        for step in 0..20 {
            for (opt, w, bias) in [(&mut host, &w1, &b1), (&mut tensors, &w2, &b2)] {
                let g = loss(w, bias, step).backward().unwrap();
                let grads: Vec<_> = opt.vars().map(|v| g.get(v.as_tensor()).cloned()).collect();
                opt.step(&grads, 0.01).unwrap();
            }
        }
        for (name, p, q) in paired_values(&a, &b) {
            for (x, y) in p.iter().zip(q) {
                assert!(
                    (x - y).abs() <= 1e-7 * (1.0 + x.abs()),
                    "{name}: {x} vs {y}"
                );
            }
        }
        let (sa, sb) = (host.state_tensors(), tensors.state_tensors());
        for (k, t) in sa {
            let p = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let q = sb[&k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (x, y) in p.iter().zip(&q) {
                assert!((x - y).abs() <= 1e-7 * (1.0 + x.abs()), "{k}: {x} vs {y}");
            }
        }
    }

    /// `step_scaled(g, lr, s)` is `step` on `g * s` (scaled by candle in f32): bit for bit on
    /// the host path, and on the composite path too.
    #[test]
    fn a_scaled_step_is_the_step_on_scaled_gradients() {
        for host in [true, false] {
            let a = ParamStore::new(&Device::Cpu);
            let (w1, b1) = problem(&a);
            let b = ParamStore::new(&Device::Cpu);
            let (w2, b2) = problem(&b);
            let mut fused = AdamW::new(&a, AdamWConfig::default()).unwrap();
            let mut plain = AdamW::new(&b, AdamWConfig::default()).unwrap();
            if !host {
                use_tensor_moments(&mut fused);
                use_tensor_moments(&mut plain);
            }
            for step in 0..10 {
                let scale = 0.37 / (1.0 + step as f64);
                let g = loss(&w1, &b1, step).backward().unwrap();
                let grads: Vec<_> = fused
                    .vars()
                    .map(|v| g.get(v.as_tensor()).cloned())
                    .collect();
                fused.step_scaled(&grads, 0.01, scale).unwrap();
                let g = loss(&w2, &b2, step).backward().unwrap();
                let grads: Vec<_> = plain
                    .vars()
                    .map(|v| g.get(v.as_tensor()).map(|g| (g * scale).unwrap()))
                    .collect();
                plain.step(&grads, 0.01).unwrap();
            }
            for (name, p, q) in paired_values(&a, &b) {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&p), bits(&q), "{name}, host path {host}");
            }
        }
    }

    /// A gradient that does not fit its parameter is refused before anything changes: no
    /// parameter updated (they update in parallel), no step counted.
    #[test]
    fn a_misfit_gradient_changes_nothing() {
        let (a, b) = (ParamStore::new(&Device::Cpu), ParamStore::new(&Device::Cpu));
        problem(&a);
        problem(&b);
        let mut opt = AdamW::new(&a, AdamWConfig::default()).unwrap();
        let names: Vec<String> = opt.names().map(str::to_string).collect();
        let grads: Vec<Option<Tensor>> = names
            .iter()
            .map(|n| {
                let len = if n == "w" { 12 } else { 4 }; // `b` has 3 values
                Some(Tensor::ones(len, DType::F32, &Device::Cpu).unwrap())
            })
            .collect();
        let err = opt.step(&grads, 0.1).unwrap_err().to_string();
        assert!(err.contains("`b`") && err.contains("4 elements"), "{err}");
        assert_eq!(opt.step_count(), 0);
        for (name, p, q) in paired_values(&a, &b) {
            assert_eq!(p, q, "{name} changed");
        }
    }

    /// A factor of 0.5 on `w` steps it exactly as a run at half the rate does, and leaves `b`
    /// at the full rate; a bad factor is refused by name.
    #[test]
    fn lr_scales_act_as_a_per_parameter_rate() {
        let (a, b) = (ParamStore::new(&Device::Cpu), ParamStore::new(&Device::Cpu));
        let ((w1, b1), (w2, b2)) = (problem(&a), problem(&b));
        let mut scaled = AdamW::new(&a, AdamWConfig::default()).unwrap();
        scaled
            .set_lr_scales(|n| if n == "w" { 0.5 } else { 1.0 })
            .unwrap();
        let mut half = AdamW::new(&b, AdamWConfig::default()).unwrap();
        for step in 0..10 {
            let g = loss(&w1, &b1, step).backward().unwrap();
            let grads: Vec<_> = scaled
                .vars()
                .map(|v| g.get(v.as_tensor()).cloned())
                .collect();
            scaled.step(&grads, 0.02).unwrap();
            // The reference: `w` at 0.01, `b` at 0.02, as two steps of one optimizer each.
            let g = loss(&w2, &b2, step).backward().unwrap();
            let names: Vec<String> = half.names().map(str::to_string).collect();
            let grads: Vec<_> = half.vars().map(|v| g.get(v.as_tensor()).cloned()).collect();
            let only = |keep: &str| -> Vec<Option<Tensor>> {
                names
                    .iter()
                    .zip(&grads)
                    .map(|(n, g)| if n == keep { g.clone() } else { None })
                    .collect()
            };
            // Each parameter's moments and bias correction see one update per step.
            half.t = step as u64;
            half.step(&only("w"), 0.01).unwrap();
            half.t = step as u64;
            half.step(&only("b"), 0.02).unwrap();
        }
        for (name, p, q) in paired_values(&a, &b) {
            for (x, y) in p.iter().zip(q) {
                assert!(
                    (x - y).abs() <= 1e-6 * (1.0 + x.abs()),
                    "{name}: {x} vs {y}"
                );
            }
        }
        let err = scaled.set_lr_scales(|_| -1.0).unwrap_err().to_string();
        assert!(err.contains('b') && err.contains("-1"), "{err}");
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

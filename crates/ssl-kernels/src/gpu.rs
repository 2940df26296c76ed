//! Ops of candle's fused GPU kernels that keep their gradients: candle's own wrappers of its
//! softmax and layer-norm kernels (`candle_nn::ops`) have no backward. Each op here launches
//! candle's kernel forward on a GPU (the launch code is candle-nn 0.11's), computes the same
//! function on the CPU for tests, and has its backward written in candle ops. The CUDA forward
//! is compiled with this crate's `cuda` feature.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor, D};

/// Softmax over the last dimension as one op with a backward: one pass per row forward (on a
/// GPU candle's fused softmax kernel, whose own wrapper `candle_nn::ops::softmax_last_dim` has
/// no backward and so cuts gradients), `y * (g - sum(g * y))` backward from the saved output.
/// f32, f64, bf16 and f16 on a GPU (the `cuda` feature); f32 and f64 on the CPU (each row in
/// f64: the CPU side serves tests, the CPU stack has its own fused kernels). Contiguous input.
/// `ssl_core::nn::ops::softmax_last_dim` runs it on GPUs.
pub struct SoftmaxLastDimOp;

impl CustomOp1 for SoftmaxLastDimOp {
    fn name(&self) -> &'static str {
        "ssl-softmax-last-dim"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        // Each row in f64 (the CPU side serves tests and small tensors: the CPU stack has its
        // own fused kernels).
        fn rows<T: candle_core::WithDType>(
            src: &[T],
            layout: &Layout,
        ) -> candle_core::Result<Vec<T>> {
            let Some((o1, o2)) = layout.contiguous_offsets() else {
                candle_core::bail!("softmax: input has to be contiguous")
            };
            let n = layout.dims().last().copied().unwrap_or(1).max(1);
            let mut dst = Vec::with_capacity(o2 - o1);
            let mut e = vec![0f64; n];
            for row in src[o1..o2].chunks(n) {
                let max = row.iter().fold(f64::NEG_INFINITY, |m, v| m.max(v.to_f64()));
                let mut sum = 0.0;
                for (ei, v) in e.iter_mut().zip(row) {
                    *ei = (v.to_f64() - max).exp();
                    sum += *ei;
                }
                dst.extend(e[..row.len()].iter().map(|ei| T::from_f64(ei / sum)));
            }
            Ok(dst)
        }
        let shape = layout.shape().clone();
        match storage {
            CpuStorage::F32(v) => Ok((CpuStorage::F32(rows(v, layout)?), shape)),
            CpuStorage::F64(v) => Ok((CpuStorage::F64(rows(v, layout)?), shape)),
            other => {
                use candle_core::backend::BackendStorage;
                candle_core::bail!("softmax: {:?} on the CPU", other.dtype())
            }
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        // candle-nn 0.11's `SoftmaxLastDim::cuda_fwd`, which launches candle's kernel.
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{
            CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
        };
        use candle_core::cuda_backend::{kernel_name, kernels, Map1, WrapErr};
        use candle_core::{CudaDevice, WithDType};

        struct S;
        impl Map1 for S {
            fn f<T: DeviceRepr + WithDType>(
                &self,
                src: &CudaSlice<T>,
                dev: &CudaDevice,
                layout: &Layout,
            ) -> candle_core::Result<CudaSlice<T>> {
                let Some((o1, o2)) = layout.contiguous_offsets() else {
                    candle_core::bail!("softmax: input has to be contiguous")
                };
                let src = src.slice(o1..o2);
                let el = layout.shape().elem_count();
                let n_cols = layout.dims().last().copied().unwrap_or(1).max(1);
                let cfg = LaunchConfig {
                    grid_dim: ((el / n_cols) as u32, 1, 1),
                    block_dim: (1, 32, 1),
                    shared_mem_bytes: 0,
                };
                let func = dev.get_or_load_func(&kernel_name::<T>("softmax"), &kernels::REDUCE)?;
                // SAFETY: every element is written by the kernel below.
                let dst = unsafe { dev.alloc::<T>(el)? };
                let mut builder = func.builder();
                builder.arg(&src);
                builder.arg(&dst);
                candle_core::builder_arg!(builder, n_cols as i32);
                // SAFETY: the kernel's arguments are the two buffers of `el` elements and the
                // row length, as candle-nn passes them.
                unsafe { builder.launch(cfg) }.w()?;
                Ok(dst)
            }
        }
        let dev = storage.device();
        let slice = S.map(&storage.slice, dev, layout)?;
        Ok((
            candle_core::CudaStorage {
                slice,
                device: dev.clone(),
            },
            layout.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let dot = (grad_res * res)?.sum_keepdim(D::Minus1)?;
        Ok(Some(res.mul(&grad_res.broadcast_sub(&dot)?)?))
    }
}

/// Layer normalisation over the last dimension, `(x - mean) / sqrt(var + eps) * w + b`, as one
/// op with a backward: one pass per row forward (on a GPU candle's layer-norm kernel, whose own
/// wrapper `candle_nn::ops::layer_norm` cuts gradients), the backward from the input with the
/// row statistics recomputed: `dx = rstd * (g w - mean(g w) - x^ mean(g w x^))`,
/// `dw = sum(g x^)`, `db = sum(g)` over the rows. f32, bf16 and f16 on a GPU (the `cuda`
/// feature); f32 and f64 on the CPU (each row in f64, for tests). Contiguous operands; weight
/// and bias of the row's length. `ssl_core::nn::ops::layer_norm` runs it on GPUs.
pub struct LayerNormFusedOp {
    /// Added to the variance.
    pub eps: f64,
}

impl CustomOp3 for LayerNormFusedOp {
    fn name(&self) -> &'static str {
        "ssl-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        // Each row in f64 (the CPU side serves tests: the CPU has its own fused kernels).
        fn rows<T: candle_core::WithDType>(
            x: &[T],
            l1: &Layout,
            w: &[T],
            l2: &Layout,
            b: &[T],
            l3: &Layout,
            eps: f64,
        ) -> candle_core::Result<Vec<T>> {
            let (Some((o1, o2)), Some((w1, w2)), Some((b1, b2))) = (
                l1.contiguous_offsets(),
                l2.contiguous_offsets(),
                l3.contiguous_offsets(),
            ) else {
                candle_core::bail!("layer norm: inputs have to be contiguous")
            };
            let (w, b) = (&w[w1..w2], &b[b1..b2]);
            let n = w.len().max(1);
            let mut dst = Vec::with_capacity(o2 - o1);
            for row in x[o1..o2].chunks(n) {
                let mean = row.iter().map(|v| v.to_f64()).sum::<f64>() / n as f64;
                let var = row.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / n as f64;
                let rstd = 1.0 / (var + eps).sqrt();
                dst.extend(row.iter().zip(w).zip(b).map(|((v, w), b)| {
                    T::from_f64((v.to_f64() - mean) * rstd * w.to_f64() + b.to_f64())
                }));
            }
            Ok(dst)
        }
        let shape = l1.shape().clone();
        match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                Ok((CpuStorage::F32(rows(x, l1, w, l2, b, l3, self.eps)?), shape))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                Ok((CpuStorage::F64(rows(x, l1, w, l2, b, l3, self.eps)?), shape))
            }
            _ => candle_core::bail!("layer norm: f32 or f64 inputs of one dtype on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        // candle-nn 0.11's `LayerNorm::cuda_fwd`, which launches candle's kernel.
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{
            CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
        };
        use candle_core::cuda_backend::{kernel_name, kernels, Map3, WrapErr};
        use candle_core::{CudaDevice, WithDType};

        struct S {
            eps: f32,
        }
        impl Map3 for S {
            #[allow(clippy::too_many_arguments)]
            fn f<T: DeviceRepr + WithDType>(
                &self,
                src: &CudaSlice<T>,
                layout: &Layout,
                alpha: &CudaSlice<T>,
                alpha_layout: &Layout,
                beta: &CudaSlice<T>,
                beta_layout: &Layout,
                dev: &CudaDevice,
            ) -> candle_core::Result<CudaSlice<T>> {
                let (Some((o1, o2)), Some((a1, a2)), Some((b1, b2))) = (
                    layout.contiguous_offsets(),
                    alpha_layout.contiguous_offsets(),
                    beta_layout.contiguous_offsets(),
                ) else {
                    candle_core::bail!("layer norm: inputs have to be contiguous")
                };
                let (src, alpha, beta) =
                    (src.slice(o1..o2), alpha.slice(a1..a2), beta.slice(b1..b2));
                let el = layout.shape().elem_count();
                let n_cols = layout.dims().last().copied().unwrap_or(1).max(1);
                let block_size: u32 = if n_cols < 1024 { 32 } else { 1024 };
                let cfg = LaunchConfig {
                    grid_dim: ((el / n_cols) as u32, 1, 1),
                    block_dim: (block_size, 1, 1),
                    shared_mem_bytes: 0,
                };
                let func =
                    dev.get_or_load_func(&kernel_name::<T>("layernorm"), &kernels::REDUCE)?;
                // SAFETY: every element is written by the kernel below.
                let dst = unsafe { dev.alloc::<T>(el)? };
                let mut builder = func.builder();
                builder.arg(&src);
                builder.arg(&dst);
                builder.arg(&alpha);
                builder.arg(&beta);
                candle_core::builder_arg!(builder, n_cols as i32, block_size as i32, self.eps);
                // SAFETY: the kernel's arguments as candle-nn passes them: the input and
                // output of `el` elements, weight and bias of a row's length, the row length,
                // the block size and epsilon.
                unsafe { builder.launch(cfg) }.w()?;
                Ok(dst)
            }
        }
        let dev = s1.device();
        let slice = S {
            eps: self.eps as f32,
        }
        .map(&s1.slice, l1, &s2.slice, l2, &s3.slice, l3, dev)?;
        Ok((
            candle_core::CudaStorage {
                slice,
                device: dev.clone(),
            },
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(D::Minus1)?;
        let rows = x.elem_count() / d.max(1);
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let rstd = (var + self.eps)?.sqrt()?.recip()?;
        let xhat = xc.broadcast_mul(&rstd)?;
        let gw = g.broadcast_mul(w)?;
        let m1 = gw.mean_keepdim(D::Minus1)?;
        let m2 = (&gw * &xhat)?.mean_keepdim(D::Minus1)?;
        let dx = gw
            .broadcast_sub(&m1)?
            .sub(&xhat.broadcast_mul(&m2)?)?
            .broadcast_mul(&rstd)?;
        let dw = (g * &xhat)?.reshape((rows, d))?.sum(0)?;
        let db = g.reshape((rows, d))?.sum(0)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

//! Where the tensors live, chosen at run time by name: `cpu`, or `cuda` / `cuda:N` in a build
//! with the `cuda` feature.
//!
//! Opening a CUDA device is checked step by step — is this build CUDA-enabled, does the driver
//! initialise, does the ordinal exist, can a context and cuBLAS be created — so that every way
//! it can fail is a message saying which and what to do, never a panic deep in a kernel
//! launch (cudarc 0.9 `unwrap`s a failed driver initialisation inside `CudaDevice::new`).

use crate::plip::{Embeddings, Plip};
use crate::preset::Preset;
use crate::text::TokenBatch;
use crate::{Error, Result};
use dfdx::prelude::Cpu;

/// True when this build was compiled with the `cuda` feature.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// A device by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    /// A CUDA GPU by ordinal (`cuda` = `cuda:0`).
    Cuda(usize),
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Parses `cpu`, `cuda` or `cuda:N`; in a build without the `cuda` feature a CUDA name is
    /// refused with the way to get a CUDA build.
    ///
    /// # Errors
    /// An unknown name, or CUDA in a CPU-only build.
    pub fn parse(name: &str) -> Result<Self> {
        let spec = match name.trim() {
            "cpu" => DeviceSpec::Cpu,
            "cuda" => DeviceSpec::Cuda(0),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => DeviceSpec::Cuda(n),
                _ => {
                    return Err(Error::Device(format!(
                        "unknown device {other:?}: expected \"cpu\", \"cuda\" or \"cuda:N\""
                    )))
                }
            },
        };
        if matches!(spec, DeviceSpec::Cuda(_)) && !CUDA_BUILT {
            return Err(Error::Device(format!(
                "{spec}: this plipd was built without CUDA support; build it with \
                 scripts/build-cuda.sh (cargo build --release --features cuda) or use \"cpu\""
            )));
        }
        Ok(spec)
    }
}

/// Work that runs on whichever device a [`DeviceSpec`] names: one generic body serves every
/// device, and [`run_on`] is the one place that opens the device.
pub trait OnDevice {
    type Output;
    fn run<D: dfdx::prelude::Device<f32>>(self, dev: D) -> Self::Output;
}

/// Opens the device `spec` names (a CUDA device seeded with `seed`, checked as [`cuda::open`]
/// does) and runs `job` on it.
///
/// # Errors
/// The device cannot be opened; `job`'s own errors are in its output.
pub fn run_on<J: OnDevice>(spec: DeviceSpec, seed: u64, job: J) -> Result<J::Output> {
    match spec {
        DeviceSpec::Cpu => Ok(job.run(Cpu::default())),
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(n) => Ok(job.run(cuda::open(n, seed)?)),
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(_) => {
            let _ = seed;
            Err(Error::Device(format!(
                "{spec}: this plipd was built without CUDA support"
            )))
        }
    }
}

/// A description of the CUDA device `ordinal` (name, memory, compute capability), after
/// checking that the driver initialises and the ordinal exists.
///
/// # Errors
/// No CUDA support in this build, no driver or no GPU, an ordinal out of range.
pub fn cuda_describe(ordinal: usize) -> Result<String> {
    #[cfg(feature = "cuda")]
    {
        cuda::check(ordinal)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(Error::Device(format!(
            "cuda:{ordinal}: this plipd was built without CUDA support"
        )))
    }
}

#[cfg(feature = "cuda")]
pub mod cuda {
    //! The CUDA side (only in builds with the `cuda` feature).
    use crate::plip::Plip;
    use crate::{Error, Result};
    use cudarc::driver::{result, sys};
    pub use dfdx::prelude::Cuda;

    /// A model on a CUDA device that the serving code may share between threads.
    ///
    /// dfdx 0.13's `Cuda` is neither `Send` nor `Sync` only because cudarc 0.9's stream handle
    /// (`CudaStream`, a raw `CUstream`) lacks the markers (later cudarc versions add them). The
    /// CUDA driver API is thread-safe, cudarc binds the device's context to the calling thread
    /// before every driver call, and dfdx guards its own caches with locks.
    #[derive(Clone)]
    pub struct SharedPlip(pub Plip<f32, Cuda>);
    // SAFETY: see the type's documentation.
    unsafe impl Send for SharedPlip {}
    // SAFETY: see the type's documentation.
    unsafe impl Sync for SharedPlip {}

    /// The driver's error code by name. (cudarc 0.9's `Debug` for `DriverError` asks the driver
    /// for a description and panics when it cannot give one.)
    fn code(e: &result::DriverError) -> String {
        format!("{:?}", e.0)
    }

    fn what_to_do() -> &'static str {
        "check that an NVIDIA GPU is present and its driver (580 or newer for CUDA 13) is \
         loaded — `nvidia-smi` must list the GPU — and that /dev/nvidia* is reachable (under \
         systemd: DeviceAllow=), or set the device to \"cpu\""
    }

    /// Driver initialised, ordinal present: returns a one-line description.
    pub(super) fn check(ordinal: usize) -> Result<String> {
        result::init().map_err(|e| {
            Error::Device(format!(
                "cuda:{ordinal}: the CUDA driver did not initialise ({}); {}",
                code(&e),
                what_to_do()
            ))
        })?;
        let count = result::device::get_count().map_err(|e| {
            Error::Device(format!(
                "cuda:{ordinal}: cannot count CUDA devices ({}); {}",
                code(&e),
                what_to_do()
            ))
        })?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::Device(format!(
                "cuda:{ordinal}: this machine has {count} usable CUDA device(s) (cuda:0 … \
                 cuda:{}); {}",
                count - 1,
                what_to_do()
            )));
        }
        let dev = result::device::get(ordinal as i32)
            .map_err(|e| Error::Device(format!("cuda:{ordinal}: {}", code(&e))))?;
        let mut name = [0 as std::ffi::c_char; 256];
        // SAFETY: the buffer is 256 bytes and the driver writes a NUL-terminated name into it.
        let name = unsafe {
            sys::cuDeviceGetName(name.as_mut_ptr(), name.len() as i32, dev)
                .result()
                .map(|_| {
                    std::ffi::CStr::from_ptr(name.as_ptr())
                        .to_string_lossy()
                        .into_owned()
                })
                .unwrap_or_else(|_| "unknown GPU".into())
        };
        // SAFETY: `dev` was returned by cuDeviceGet.
        let mem = unsafe { result::device::total_mem(dev) }.unwrap_or(0);
        let attr = |a| unsafe { result::device::get_attribute(dev, a) }.unwrap_or(0);
        let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR);
        let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR);
        let mut driver = 0;
        // SAFETY: writes one int.
        let _ = unsafe { sys::cuDriverGetVersion(&mut driver) };
        Ok(format!(
            "cuda:{ordinal} {name}, {:.1} GiB, compute capability {major}.{minor}, driver API {}.{}",
            mem as f64 / (1u64 << 30) as f64,
            driver / 1000,
            (driver % 1000) / 10
        ))
    }

    /// Opens CUDA device `ordinal` with a seeded RNG, checking first (see the module docs).
    ///
    /// # Errors
    /// As [`check`], or a context / cuBLAS handle that cannot be created (out of memory).
    pub fn open(ordinal: usize, seed: u64) -> Result<Cuda> {
        check(ordinal)?;
        Cuda::try_build(ordinal, seed).map_err(|e| {
            Error::Device(format!(
                "cuda:{ordinal}: cannot create a context and cuBLAS handle ({e:?}); the GPU may \
                 be out of memory or in exclusive use by another process"
            ))
        })
    }
}

impl<D: dfdx::prelude::Device<f32>> Plip<f32, D> {
    /// A copy of this model on the CPU (checkpoints and evaluation are device-independent).
    ///
    /// # Errors
    /// Not expected: the preset was valid when this model was made.
    pub fn to_cpu(&self) -> Result<Plip<f32, Cpu>> {
        let mut cpu = Plip::new(&Cpu::default(), &self.preset, 0)?;
        crate::weights::copy_weights(self, &mut cpu);
        Ok(cpu)
    }
}

/// The encoder on whichever device was configured: embedding calls dispatch to the device's
/// model and return host arrays, so callers (serving, evaluation) need not know the device.
#[derive(Clone)]
pub enum Encoder {
    Cpu(Plip<f32, Cpu>),
    /// The model and the ordinal of its GPU.
    #[cfg(feature = "cuda")]
    Cuda(cuda::SharedPlip, usize),
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Encoder({} on {})", self.preset().name, self.device())
    }
}

impl Encoder {
    /// A freshly initialised model of `preset` on `spec`.
    ///
    /// # Errors
    /// An invalid preset or an unusable device.
    pub fn new(spec: DeviceSpec, preset: &Preset, seed: u64) -> Result<Self> {
        match spec {
            DeviceSpec::Cpu => Ok(Encoder::Cpu(Plip::new(&Cpu::default(), preset, seed)?)),
            #[cfg(feature = "cuda")]
            DeviceSpec::Cuda(n) => Ok(Encoder::Cuda(
                cuda::SharedPlip(Plip::new(&cuda::open(n, seed)?, preset, seed)?),
                n,
            )),
            #[cfg(not(feature = "cuda"))]
            DeviceSpec::Cuda(_) => Err(Error::Device(format!(
                "{spec}: this plipd was built without CUDA support"
            ))),
        }
    }

    /// The device it runs on.
    pub fn device(&self) -> DeviceSpec {
        match self {
            Encoder::Cpu(_) => DeviceSpec::Cpu,
            #[cfg(feature = "cuda")]
            Encoder::Cuda(_, n) => DeviceSpec::Cuda(*n),
        }
    }

    /// Chooses the joint image feature by name (weights unchanged).
    ///
    /// # Errors
    /// See [`Preset::with_joint`].
    pub fn set_joint(&mut self, name: &str) -> Result<()> {
        let set = |p: &mut Preset| {
            *p = p.with_joint(name)?;
            Ok(())
        };
        match self {
            Encoder::Cpu(m) => set(&mut m.preset),
            #[cfg(feature = "cuda")]
            Encoder::Cuda(cuda::SharedPlip(m), _) => set(&mut m.preset),
        }
    }

    /// Embed images as the mean of themselves and their mirror images (or not); see
    /// [`Preset::flip_average`].
    pub fn set_flip_average(&mut self, on: bool) {
        match self {
            Encoder::Cpu(m) => m.preset.flip_average = on,
            #[cfg(feature = "cuda")]
            Encoder::Cuda(cuda::SharedPlip(m), _) => m.preset.flip_average = on,
        }
    }

    /// Rank by attribute agreement with weight `weight` beside the joint feature (0 = off);
    /// see [`Preset::attribute_weight`].
    pub fn set_attribute_weight(&mut self, weight: f64) {
        match self {
            Encoder::Cpu(m) => m.preset.attribute_weight = weight,
            #[cfg(feature = "cuda")]
            Encoder::Cuda(cuda::SharedPlip(m), _) => m.preset.attribute_weight = weight,
        }
    }

    pub fn preset(&self) -> &Preset {
        match self {
            Encoder::Cpu(m) => &m.preset,
            #[cfg(feature = "cuda")]
            Encoder::Cuda(cuda::SharedPlip(m), _) => &m.preset,
        }
    }

    /// See [`Plip::embed_images`].
    pub fn embed_images(&self, images: &[f32], batch_size: usize) -> Embeddings {
        match self {
            Encoder::Cpu(m) => m.embed_images(images, batch_size),
            #[cfg(feature = "cuda")]
            Encoder::Cuda(cuda::SharedPlip(m), _) => m.embed_images(images, batch_size),
        }
    }

    /// See [`Plip::embed_texts`].
    pub fn embed_texts(&self, tokens: &TokenBatch, batch_size: usize) -> Embeddings {
        match self {
            Encoder::Cpu(m) => m.embed_texts(tokens, batch_size),
            #[cfg(feature = "cuda")]
            Encoder::Cuda(cuda::SharedPlip(m), _) => m.embed_texts(tokens, batch_size),
        }
    }

    /// See [`Plip::calibrate_neck`].
    pub fn calibrate_neck(&mut self, images: &[f32], batch_size: usize) -> usize {
        match self {
            Encoder::Cpu(m) => m.calibrate_neck(images, batch_size),
            #[cfg(feature = "cuda")]
            Encoder::Cuda(cuda::SharedPlip(m), _) => m.calibrate_neck(images, batch_size),
        }
    }

    /// See [`Plip::image_attributes`].
    pub fn image_attributes(&self, images: &[f32], batch_size: usize) -> Option<Vec<f32>> {
        match self {
            Encoder::Cpu(m) => m.image_attributes(images, batch_size),
            #[cfg(feature = "cuda")]
            Encoder::Cuda(cuda::SharedPlip(m), _) => m.image_attributes(images, batch_size),
        }
    }

    /// See [`Plip::text_attributes`].
    pub fn text_attributes(&self, tokens: &TokenBatch, batch_size: usize) -> Option<Vec<f32>> {
        match self {
            Encoder::Cpu(m) => m.text_attributes(tokens, batch_size),
            #[cfg(feature = "cuda")]
            Encoder::Cuda(cuda::SharedPlip(m), _) => m.text_attributes(tokens, batch_size),
        }
    }

    /// Loads safetensors weights (see [`crate::weights::load_weights`]).
    ///
    /// # Errors
    /// As `load_weights`.
    pub fn load_weights(
        &mut self,
        bytes: &[u8],
        tokenizer: &str,
    ) -> Result<crate::weights::BlobMeta> {
        match self {
            Encoder::Cpu(m) => crate::weights::load_weights(m, bytes, tokenizer),
            #[cfg(feature = "cuda")]
            Encoder::Cuda(cuda::SharedPlip(m), _) => {
                crate::weights::load_weights(m, bytes, tokenizer)
            }
        }
    }

    /// The weights as safetensors bytes (see [`crate::weights::save_weights`]).
    ///
    /// # Errors
    /// As `save_weights`.
    pub fn save_weights(
        &self,
        tokenizer: &str,
        step: u64,
        extra: &std::collections::BTreeMap<String, String>,
    ) -> Result<Vec<u8>> {
        match self {
            Encoder::Cpu(m) => crate::weights::save_weights(m, tokenizer, step, extra),
            #[cfg(feature = "cuda")]
            Encoder::Cuda(cuda::SharedPlip(m), _) => {
                crate::weights::save_weights(m, tokenizer, step, extra)
            }
        }
    }

    /// A copy on the CPU (exports, tools that need `Plip<f32, Cpu>`).
    ///
    /// # Errors
    /// Copying failed (not expected).
    pub fn to_cpu(&self) -> Result<Plip<f32, Cpu>> {
        match self {
            Encoder::Cpu(m) => Ok(m.clone()),
            #[cfg(feature = "cuda")]
            Encoder::Cuda(cuda::SharedPlip(m), _) => m.to_cpu(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!(DeviceSpec::parse("cpu").unwrap(), DeviceSpec::Cpu);
        for bad in ["gpu", "cuda:x", "cuda:", "CPU", "cuda:-1"] {
            let e = DeviceSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains("unknown device"), "{bad}: {e}");
        }
        if CUDA_BUILT {
            assert_eq!(DeviceSpec::parse("cuda").unwrap(), DeviceSpec::Cuda(0));
            assert_eq!(DeviceSpec::parse("cuda:3").unwrap(), DeviceSpec::Cuda(3));
        } else {
            let e = DeviceSpec::parse("cuda:1").unwrap_err().to_string();
            assert!(
                e.contains("built without CUDA") && e.contains("build-cuda.sh"),
                "{e}"
            );
        }
    }

    #[test]
    fn the_cpu_encoder_round_trips_its_weights() {
        let p = Preset::test();
        let a = Encoder::new(DeviceSpec::Cpu, &p, 1).unwrap();
        let mut b = Encoder::new(DeviceSpec::Cpu, &p, 2).unwrap();
        let bytes = a.save_weights("tok", 3, &Default::default()).unwrap();
        b.load_weights(&bytes, "tok").unwrap();
        let imgs = vec![0.1f32; 2 * p.image_len()];
        assert_eq!(a.embed_images(&imgs, 2).data, b.embed_images(&imgs, 2).data);
        assert_eq!(a.device(), DeviceSpec::Cpu);
    }
}

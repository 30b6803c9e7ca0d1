//! Checkpoints: named tensors and metadata in the safetensors format, written atomically.
//!
//! A checkpoint is a dictionary of named tensors (parameters, optimizer state such as Adam's
//! moments) plus string metadata (step, epoch, anything else). Files use the
//! [safetensors](https://github.com/huggingface/safetensors) format, so PyTorch (through the
//! `safetensors` package) reads them as they are.
//!
//! [`CheckpointDir::save`] writes a temporary file in the target directory, flushes it to
//! disk (`fsync`), renames it over its final name and flushes the directory: a crash at any
//! moment leaves either the previous newest checkpoint or the new one, never a torn file
//! under a checkpoint name. It keeps the newest `keep` checkpoints and deletes older ones.
//! In data-parallel training all replicas are equal, so only rank 0 saves.
//!
//! Loading needs the same names: [`Checkpoint::strip_prefix`] removes a wrapper's prefix
//! such as PyTorch DDP's `module.`. Tensors are plain host memory, so a file written on any
//! machine loads on any other (PyTorch's device mapping question does not arise).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::element::{DType, Element};
use crate::error::{Error, IoContext, Result};

/// One tensor of a checkpoint: element type, shape and little-endian bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Element type.
    pub dtype: DType,
    /// Dimensions (empty for a scalar).
    pub shape: Vec<usize>,
    /// The elements, row-major, as bytes.
    pub data: Vec<u8>,
}

impl Tensor {
    /// A tensor of `shape` holding `data` (whose length must be the product of `shape`).
    pub fn from_slice<T: Element>(shape: &[usize], data: &[T]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::invalid(
                "Tensor::from_slice",
                "data",
                format!("{} elements for shape {shape:?} ({n} elements)", data.len()),
            ));
        }
        Ok(Tensor {
            dtype: T::DTYPE,
            shape: shape.to_vec(),
            data: bytemuck::cast_slice(data).to_vec(),
        })
    }

    /// The elements as `T` (which must be the tensor's type).
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype {
            return Err(Error::invalid(
                "Tensor::to_vec",
                "T",
                format!("the tensor holds {}, not {}", self.dtype, T::DTYPE),
            ));
        }
        let mut out = vec![T::zeroed(); self.data.len() / std::mem::size_of::<T>()];
        bytemuck::cast_slice_mut(&mut out).copy_from_slice(&self.data);
        Ok(out)
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Named tensors and metadata; see the module documentation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Checkpoint {
    /// Tensors by name.
    pub tensors: BTreeMap<String, Tensor>,
    /// String metadata (the safetensors `__metadata__` table): step, epoch, ...
    pub metadata: BTreeMap<String, String>,
}

fn to_st(d: DType) -> safetensors::Dtype {
    use safetensors::Dtype as S;
    match d {
        DType::U8 => S::U8,
        DType::U16 => S::U16,
        DType::U32 => S::U32,
        DType::U64 => S::U64,
        DType::I8 => S::I8,
        DType::I16 => S::I16,
        DType::I32 => S::I32,
        DType::I64 => S::I64,
        DType::F16 => S::F16,
        DType::BF16 => S::BF16,
        DType::F32 => S::F32,
        DType::F64 => S::F64,
    }
}

fn from_st(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::U8 => DType::U8,
        S::U16 => DType::U16,
        S::U32 => DType::U32,
        S::U64 => DType::U64,
        S::I8 => DType::I8,
        S::I16 => DType::I16,
        S::I32 => DType::I32,
        S::I64 => DType::I64,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F32 => DType::F32,
        S::F64 => DType::F64,
        _ => return None,
    })
}

impl Checkpoint {
    /// An empty checkpoint.
    pub fn new() -> Checkpoint {
        Checkpoint::default()
    }

    /// Adds (or replaces) tensor `name` with `shape` and `data`.
    pub fn insert<T: Element>(&mut self, name: &str, shape: &[usize], data: &[T]) -> Result<()> {
        self.tensors
            .insert(name.to_string(), Tensor::from_slice(shape, data)?);
        Ok(())
    }

    /// The elements of tensor `name` as `T`.
    pub fn get<T: Element>(&self, name: &str) -> Result<Vec<T>> {
        self.tensor(name)?.to_vec()
    }

    /// Tensor `name`, or an error listing the names there are.
    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| {
            let names: Vec<&str> = self.tensors.keys().map(String::as_str).take(20).collect();
            Error::invalid(
                "Checkpoint::tensor",
                "name",
                format!("no tensor {name:?}; the checkpoint has {names:?}"),
            )
        })
    }

    /// Sets metadata `key` to `value`.
    pub fn set_meta(&mut self, key: &str, value: impl ToString) {
        self.metadata.insert(key.to_string(), value.to_string());
    }

    /// Metadata `key` parsed as an unsigned integer (e.g. `step`, `epoch`).
    pub fn meta_u64(&self, key: &str) -> Result<u64> {
        let v = self.metadata.get(key).ok_or_else(|| {
            Error::invalid(
                "Checkpoint::meta_u64",
                "key",
                format!("no metadata {key:?}"),
            )
        })?;
        v.parse().map_err(|_| {
            Error::invalid(
                "Checkpoint::meta_u64",
                "key",
                format!("metadata {key}={v:?} is not an integer"),
            )
        })
    }

    /// Removes `prefix` from every tensor name that has it (e.g. PyTorch DDP's `module.`).
    pub fn strip_prefix(mut self, prefix: &str) -> Checkpoint {
        self.tensors = std::mem::take(&mut self.tensors)
            .into_iter()
            .map(|(k, v)| match k.strip_prefix(prefix) {
                Some(s) => (s.to_string(), v),
                None => (k, v),
            })
            .collect();
        self
    }

    /// Encodes in the safetensors format.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let views = self
            .tensors
            .iter()
            .map(|(name, t)| {
                safetensors::tensor::TensorView::new(to_st(t.dtype), t.shape.clone(), &t.data)
                    .map(|v| (name.as_str(), v))
                    .map_err(|e| {
                        Error::invalid("Checkpoint::to_bytes", name.clone(), e.to_string())
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let meta: HashMap<String, String> = self.metadata.clone().into_iter().collect();
        safetensors::serialize(views, (!meta.is_empty()).then_some(meta))
            .map_err(|e| Error::invalid("Checkpoint::to_bytes", "checkpoint", e.to_string()))
    }

    /// Decodes the safetensors format; `what` names the source in errors.
    pub fn from_bytes(bytes: &[u8], what: &str) -> Result<Checkpoint> {
        let bad = |detail: String| {
            Error::misbehaved(
                what.to_string(),
                format!("not a readable safetensors checkpoint: {detail}"),
            )
        };
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let (_, header) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
        let mut ck = Checkpoint::new();
        if let Some(meta) = header.metadata() {
            ck.metadata = meta.clone().into_iter().collect();
        }
        for (name, view) in st.tensors() {
            let dtype = from_st(view.dtype()).ok_or_else(|| {
                bad(format!(
                    "tensor {name:?} has unsupported type {:?}",
                    view.dtype()
                ))
            })?;
            ck.tensors.insert(
                name,
                Tensor {
                    dtype,
                    shape: view.shape().to_vec(),
                    data: view.data().to_vec(),
                },
            );
        }
        Ok(ck)
    }

    /// Reads a checkpoint file.
    pub fn load(path: &Path) -> Result<Checkpoint> {
        let bytes = fs::read(path).ctx(|| format!("reading checkpoint {}", path.display()))?;
        Checkpoint::from_bytes(&bytes, &path.display().to_string())
    }
}

/// A directory of numbered checkpoints `ckpt-<step>.safetensors`, keeping the newest few.
#[derive(Clone, Debug)]
pub struct CheckpointDir {
    dir: PathBuf,
    keep: usize,
}

const PREFIX: &str = "ckpt-";
const SUFFIX: &str = ".safetensors";

impl CheckpointDir {
    /// Checkpoints in `dir` (created if missing), keeping the newest `keep` (at least 1).
    pub fn new(dir: impl Into<PathBuf>, keep: usize) -> Result<CheckpointDir> {
        let dir = dir.into();
        fs::create_dir_all(&dir)
            .ctx(|| format!("creating checkpoint directory {}", dir.display()))?;
        Ok(CheckpointDir {
            dir,
            keep: keep.max(1),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn file_of(&self, step: u64) -> PathBuf {
        self.dir.join(format!("{PREFIX}{step:010}{SUFFIX}"))
    }

    /// Saves `ckpt` as step `step` (also recorded in its metadata) atomically, then deletes
    /// checkpoints beyond the newest `keep` and temporary files of interrupted saves.
    pub fn save(&self, step: u64, ckpt: &Checkpoint) -> Result<PathBuf> {
        let mut ckpt = ckpt.clone();
        ckpt.set_meta("step", step);
        let bytes = ckpt.to_bytes()?;
        let final_path = self.file_of(step);
        let tmp = self.dir.join(format!(
            ".{PREFIX}{step:010}{SUFFIX}.tmp-{}",
            std::process::id()
        ));
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, &final_path)?;
            // The rename itself must reach the disk.
            fs::File::open(&self.dir)?.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(
                format!("saving checkpoint {}", final_path.display()),
                e,
            ));
        }
        self.prune()?;
        Ok(final_path)
    }

    /// Steps of the checkpoints present, oldest first.
    pub fn steps(&self) -> Result<Vec<u64>> {
        let mut steps = Vec::new();
        for entry in fs::read_dir(&self.dir).ctx(|| format!("listing {}", self.dir.display()))? {
            let entry = entry.ctx(|| format!("listing {}", self.dir.display()))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(step) = name
                .strip_prefix(PREFIX)
                .and_then(|s| s.strip_suffix(SUFFIX))
                && let Ok(step) = step.parse::<u64>()
            {
                steps.push(step);
            }
        }
        steps.sort_unstable();
        Ok(steps)
    }

    fn prune(&self) -> Result<()> {
        let steps = self.steps()?;
        for &old in steps.iter().take(steps.len().saturating_sub(self.keep)) {
            let p = self.file_of(old);
            fs::remove_file(&p).ctx(|| format!("removing old checkpoint {}", p.display()))?;
        }
        // Leftovers of saves that crashed (ours or an earlier process's).
        for entry in fs::read_dir(&self.dir)
            .ctx(|| format!("listing {}", self.dir.display()))?
            .flatten()
        {
            let name = entry.file_name();
            if name
                .to_str()
                .is_some_and(|n| n.starts_with(&format!(".{PREFIX}")) && n.contains(".tmp-"))
            {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    /// The newest checkpoint and its step, if there is any.
    pub fn load_latest(&self) -> Result<Option<(u64, Checkpoint)>> {
        match self.steps()?.last() {
            Some(&step) => Ok(Some((step, Checkpoint::load(&self.file_of(step))?))),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    fn sample() -> Checkpoint {
        let mut c = Checkpoint::new();
        c.insert(
            "module.linear.weight",
            &[1, 5],
            &[0.5f32, -1.0, 2.0, 3.5, 0.0],
        )
        .unwrap();
        c.insert("module.linear.bias", &[1], &[0.25f32]).unwrap();
        c.insert("adam.m.linear.weight", &[5], &[bf16::from_f32(1.0); 5])
            .unwrap();
        c.insert("counts", &[2, 2], &[1i64, 2, 3, 4]).unwrap();
        c.set_meta("epoch", 3);
        c
    }

    #[test]
    fn round_trips_through_bytes() {
        let c = sample();
        let back = Checkpoint::from_bytes(&c.to_bytes().unwrap(), "test").unwrap();
        assert_eq!(back, c);
        assert_eq!(back.get::<i64>("counts").unwrap(), vec![1, 2, 3, 4]);
        assert_eq!(back.meta_u64("epoch").unwrap(), 3);
        let stripped = back.strip_prefix("module.");
        assert_eq!(stripped.get::<f32>("linear.bias").unwrap(), vec![0.25]);
        assert!(
            stripped.get::<f32>("counts").is_err(),
            "wrong type is refused"
        );
        let err = stripped.get::<f32>("nope").unwrap_err().to_string();
        assert!(err.contains("linear.bias"), "lists the names: {err}");
    }

    #[test]
    fn bad_shapes_and_garbage_are_errors() {
        assert!(Tensor::from_slice(&[2, 2], &[1f32; 3]).is_err());
        assert!(Checkpoint::from_bytes(b"not a checkpoint at all", "x").is_err());
        let bytes = sample().to_bytes().unwrap();
        assert!(
            Checkpoint::from_bytes(&bytes[..bytes.len() - 3], "x").is_err(),
            "truncated"
        );
    }

    #[test]
    fn directory_keeps_the_newest_and_ignores_temporaries() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CheckpointDir::new(tmp.path().join("ck"), 2).unwrap();
        assert!(dir.load_latest().unwrap().is_none());
        for step in [10, 20, 30] {
            let mut c = sample();
            c.set_meta("epoch", step / 10);
            dir.save(step, &c).unwrap();
        }
        assert_eq!(dir.steps().unwrap(), vec![20, 30]);
        // A torn temporary file of a crashed save is neither loaded nor kept.
        fs::write(
            dir.path().join(".ckpt-0000000040.safetensors.tmp-1"),
            b"partial",
        )
        .unwrap();
        let (step, c) = dir.load_latest().unwrap().unwrap();
        assert_eq!(
            (
                step,
                c.meta_u64("step").unwrap(),
                c.meta_u64("epoch").unwrap()
            ),
            (30, 30, 3)
        );
        dir.save(40, &sample()).unwrap();
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
    }
}

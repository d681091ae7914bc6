//! The inputs of a check: random (seeded) in each input's type and shape, or real data from
//! .npy / .npz files; the shapes both models are run at.

use super::report::InputSpec;
use super::VerifyOptions;
use crate::error::Error;
use crate::tract::errors::{chain_msg, summarize};
use crate::tract::shapes::{Fixed, SymbolValue};
use crate::tract::{dt_name, is_float, is_int, DeclDim, InputFact, Signature};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;
use tract_onnx::prelude::*;

/// Decodes raw little/big-endian npy data of descriptor `descr` into a tensor.
fn tensor_from_npy_bytes(descr: &str, shape: &[usize], bytes: &[u8]) -> Result<Tensor, String> {
    let (order, kind) = descr.split_at(1.min(descr.len()));
    let big = match order {
        "<" | "|" | "=" => false,
        ">" => true,
        _ => return Err(format!("unsupported npy dtype descriptor '{descr}'")),
    };
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("npy shape {shape:?} has too many elements"))?;
    macro_rules! decode {
        ($t:ty, $size:expr, $conv:expr) => {{
            if n.checked_mul($size) != Some(bytes.len()) {
                return Err(format!(
                    "npy data has {} bytes, expected {} for shape {:?} of '{}'",
                    bytes.len(),
                    n.saturating_mul($size),
                    shape,
                    descr
                ));
            }
            let v: Vec<$t> = bytes
                .chunks_exact($size)
                .map(|c| {
                    let mut a = [0u8; $size];
                    a.copy_from_slice(c);
                    if big {
                        a.reverse();
                    }
                    $conv(a)
                })
                .collect();
            Tensor::from_shape::<$t>(shape, &v).map_err(|e| chain_msg(&e))
        }};
    }
    match kind {
        "f2" => decode!(f16, 2, |a: [u8; 2]| f16::from_bits(u16::from_le_bytes(a))),
        "f4" => decode!(f32, 4, f32::from_le_bytes),
        "f8" => decode!(f64, 8, f64::from_le_bytes),
        "i1" => decode!(i8, 1, i8::from_le_bytes),
        "i2" => decode!(i16, 2, i16::from_le_bytes),
        "i4" => decode!(i32, 4, i32::from_le_bytes),
        "i8" => decode!(i64, 8, i64::from_le_bytes),
        "u1" => decode!(u8, 1, u8::from_le_bytes),
        "u2" => decode!(u16, 2, u16::from_le_bytes),
        "u4" => decode!(u32, 4, u32::from_le_bytes),
        "u8" => decode!(u64, 8, u64::from_le_bytes),
        "b1" => decode!(bool, 1, |a: [u8; 1]| a[0] != 0),
        _ => Err(format!("unsupported npy dtype descriptor '{descr}'")),
    }
}

/// A tensor from .npy bytes (header and data).
fn read_npy(mut r: impl Read) -> Result<Tensor, String> {
    let header =
        ndarray_npy::npy::header::Header::from_reader(&mut r).map_err(|e| format!("not a valid .npy file: {e}"))?;
    let descr = header
        .type_descriptor
        .as_string()
        .cloned()
        .ok_or_else(|| format!("unsupported npy dtype (structured): {}", header.type_descriptor))?;
    let mut bytes = vec![];
    r.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    if header.layout.is_fortran() {
        let rev: Vec<usize> = header.shape.iter().rev().copied().collect();
        let t = tensor_from_npy_bytes(&descr, &rev, &bytes)?;
        let axes: Vec<usize> = (0..rev.len()).rev().collect();
        t.permute_axes(&axes).map_err(|e| chain_msg(&e))
    } else {
        tensor_from_npy_bytes(&descr, &header.shape, &bytes)
    }
}

fn read_npy_file(path: &Path) -> Result<Tensor, String> {
    read_npy(std::io::BufReader::new(std::fs::File::open(path).map_err(|e| e.to_string())?))
}

fn open_npz(path: &Path) -> Result<zip::ZipArchive<std::fs::File>, String> {
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    zip::ZipArchive::new(f).map_err(|e| format!("not a valid .npz file: {e}"))
}

/// The array `name` of an .npz file (any dtype .npy holds: float16 included).
pub(crate) fn read_npz_array(path: &Path, name: &str) -> Result<Tensor, String> {
    let mut npz = open_npz(path)?;
    let entry = npz.by_name(&format!("{name}.npy")).map_err(|e| format!("cannot read array `{name}`: {e}"))?;
    read_npy(entry)
}

/// The names of the arrays of an .npz file.
pub(crate) fn npz_names(path: &Path) -> Result<Vec<String>, String> {
    let npz = open_npz(path)?;
    Ok(npz.file_names().map(|n| n.strip_suffix(".npy").unwrap_or(n).to_string()).collect())
}

/// A tensor as .npy bytes (version 1.0, little-endian, C order).
fn npy_bytes(t: &Tensor) -> Result<Vec<u8>, String> {
    let (descr, bytes): (&str, Vec<u8>) = match t.datum_type() {
        DatumType::F16 => (
            "<f2",
            t.try_as_plain_ram()
                .map_err(|e| chain_msg(&e))?
                .as_slice::<f16>()
                .map_err(|e| chain_msg(&e))?
                .iter()
                .flat_map(|v| v.to_bits().to_le_bytes())
                .collect(),
        ),
        DatumType::F32 => ("<f4", le(t, |v: &f32| v.to_le_bytes().to_vec())?),
        DatumType::F64 => ("<f8", le(t, |v: &f64| v.to_le_bytes().to_vec())?),
        DatumType::I8 => ("|i1", le(t, |v: &i8| v.to_le_bytes().to_vec())?),
        DatumType::I16 => ("<i2", le(t, |v: &i16| v.to_le_bytes().to_vec())?),
        DatumType::I32 => ("<i4", le(t, |v: &i32| v.to_le_bytes().to_vec())?),
        DatumType::I64 => ("<i8", le(t, |v: &i64| v.to_le_bytes().to_vec())?),
        DatumType::U8 => ("|u1", le(t, |v: &u8| v.to_le_bytes().to_vec())?),
        DatumType::U16 => ("<u2", le(t, |v: &u16| v.to_le_bytes().to_vec())?),
        DatumType::U32 => ("<u4", le(t, |v: &u32| v.to_le_bytes().to_vec())?),
        DatumType::U64 => ("<u8", le(t, |v: &u64| v.to_le_bytes().to_vec())?),
        DatumType::Bool => ("|b1", le(t, |v: &bool| vec![*v as u8])?),
        other => return Err(format!("cannot write {} to .npy", dt_name(other))),
    };
    let shape = match t.shape() {
        [d] => format!("({d},)"),
        s => format!("({})", s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // magic (6) + version (2) + header length (2) + header, padded with spaces to 64, newline last
    let total = (10 + header.len() + 1).div_ceil(64) * 64;
    header.push_str(&" ".repeat(total - 10 - header.len() - 1));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&bytes);
    Ok(out)
}

fn le<T: Datum>(t: &Tensor, f: impl Fn(&T) -> Vec<u8>) -> Result<Vec<u8>, String> {
    Ok(t.try_as_plain_ram()
        .map_err(|e| chain_msg(&e))?
        .as_slice::<T>()
        .map_err(|e| chain_msg(&e))?
        .iter()
        .flat_map(f)
        .collect())
}

/// Write named tensors as an .npz file (uncompressed, as numpy's `savez`).
pub(crate) fn write_npz(path: &Path, arrays: &[(String, Tensor)]) -> Result<(), String> {
    use std::io::Write;
    let f = std::fs::File::create(path).map_err(|e| e.to_string())?;
    let mut z = zip::ZipWriter::new(f);
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, t) in arrays {
        z.start_file(format!("{name}.npy"), opts).map_err(|e| e.to_string())?;
        z.write_all(&npy_bytes(t)?).map_err(|e| e.to_string())?;
    }
    z.finish().map_err(|e| e.to_string())?;
    Ok(())
}

struct Normal {
    spare: Option<f64>,
}

impl Normal {
    fn sample(&mut self, rng: &mut StdRng) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some(r * t.sin());
        r * t.cos()
    }
}

fn random_tensor(dt: DatumType, shape: &[usize], rng: &mut StdRng) -> Result<Tensor, String> {
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} has too many elements"))?;
    let mut normal = Normal { spare: None };
    macro_rules! floats {
        ($t:ty, $conv:expr) => {{
            let v: Vec<$t> = (0..n).map(|_| $conv(normal.sample(rng))).collect();
            Tensor::from_shape::<$t>(shape, &v)
        }};
    }
    macro_rules! ints {
        ($t:ty) => {{
            let v: Vec<$t> = (0..n).map(|_| rng.random_range(0..=3u8) as $t).collect();
            Tensor::from_shape::<$t>(shape, &v)
        }};
    }
    let t = match dt {
        DatumType::F32 => floats!(f32, |x: f64| x as f32),
        DatumType::F64 => floats!(f64, |x: f64| x),
        DatumType::F16 => floats!(f16, |x: f64| f16::from_f64(x)),
        DatumType::I8 => ints!(i8),
        DatumType::I16 => ints!(i16),
        DatumType::I32 => ints!(i32),
        DatumType::I64 => ints!(i64),
        DatumType::U8 => ints!(u8),
        DatumType::U16 => ints!(u16),
        DatumType::U32 => ints!(u32),
        DatumType::U64 => ints!(u64),
        DatumType::Bool => {
            let v: Vec<bool> = (0..n).map(|_| rng.random::<bool>()).collect();
            Tensor::from_shape::<bool>(shape, &v)
        }
        other => return Err(format!("cannot generate random inputs of type {}", dt_name(other))),
    };
    t.map_err(|e| chain_msg(&e))
}

/// One input of the check: its name, type and shape, and where its values come from.
#[derive(Clone)]
pub(crate) struct ResolvedInput {
    pub(crate) name: String,
    pub(crate) dt: DatumType,
    pub(crate) shape: Vec<usize>,
    /// Real data, if it comes from a file.
    pub(crate) data: Option<Tensor>,
    pub(crate) source: String,
    /// The input's own type when the models run as float32 upcasts (random values are rounded
    /// to it first).
    pub(crate) stored: Option<crate::model::tensor::FloatType>,
}

impl ResolvedInput {
    /// What the report says about it.
    pub(crate) fn spec(&self) -> InputSpec {
        use crate::model::tensor::FloatType;
        let dtype = match self.stored {
            Some(FloatType::F16) => "float16".to_string(),
            Some(FloatType::BF16) => "bfloat16".to_string(),
            _ => dt_name(self.dt),
        };
        InputSpec { name: self.name.clone(), shape: self.shape.clone(), dtype, source: self.source.clone() }
    }

    /// The type and shape to pin the models' input to.
    pub(crate) fn fact(&self) -> InputFact {
        InputFact { name: self.name.clone(), dt: self.dt, shape: self.shape.clone() }
    }
}

/// `t` (float32) with every value rounded to `ft` (exactly representable in float32 again).
fn round_to(t: &Tensor, ft: crate::model::tensor::FloatType) -> Result<Tensor, String> {
    use crate::model::tensor::FloatType;
    let v = t.try_as_plain_ram().map_err(|e| chain_msg(&e))?;
    let r: Vec<f32> = v
        .as_slice::<f32>()
        .map_err(|e| chain_msg(&e))?
        .iter()
        .map(|&x| match ft {
            FloatType::F16 => f16::from_f32(x).to_f32(),
            FloatType::BF16 => half::bf16::from_f32(x).to_f32(),
            _ => x,
        })
        .collect();
    Tensor::from_shape(t.shape(), &r).map_err(|e| chain_msg(&e))
}

/// One sample: every input's values (from its file, or drawn from `rng` in input order).
pub(crate) fn sample(inputs: &[ResolvedInput], rng: &mut StdRng) -> Result<HashMap<String, Tensor>, Error> {
    let mut data = HashMap::new();
    for i in inputs {
        let t = match &i.data {
            Some(t) => t.clone(),
            None => random_tensor(i.dt, &i.shape, rng).map_err(Error::Input)?,
        };
        let t = match (i.stored, t.datum_type()) {
            (Some(ft), DatumType::F32) if i.data.is_none() => round_to(&t, ft).map_err(Error::Input)?,
            _ => t,
        };
        data.insert(i.name.clone(), t);
    }
    Ok(data)
}

/// The graph inputs both models run at and the samples drawn of them, as the whole check and a
/// check in parts take them.
pub(crate) struct Drawn {
    pub(crate) inputs: Vec<ResolvedInput>,
    /// Every input comes from a file (then there is one sample).
    pub(crate) all_files: bool,
    /// Each sample's values, by input name.
    pub(crate) data: Vec<HashMap<String, Tensor>>,
}

/// The inputs the reference `r` and the candidate (signatures `rsig` and `csig`, already found
/// alike by `check_signature`) resolve to, a half-precision input drawn in its stored type, and
/// the samples drawn from them with the seed.
pub(crate) fn draw_inputs(
    r: &super::prepared::Prepared,
    rsig: &Signature,
    csig: &Signature,
    opts: &VerifyOptions,
    notes: &mut Vec<String>,
) -> Result<Drawn, Error> {
    let fixed = fixed_symbols(&r.model, rsig, opts);
    let mut inputs = resolve_inputs(rsig, csig, opts, &fixed, notes)?;
    for i in &mut inputs {
        i.stored = r.half.get(&i.name).copied();
    }
    let all_files = inputs.iter().all(|i| i.data.is_some());
    let samples = if all_files { 1 } else { opts.samples };
    if all_files && opts.samples != 1 {
        notes.push("every input comes from a file: one sample".into());
    }
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let data = (0..samples).map(|_| sample(&inputs, &mut rng)).collect::<Result<_, _>>()?;
    Ok(Drawn { inputs, all_files, data })
}

/// What the latency bench runs two models on: the inputs the check resolves and the first sample
/// it draws from them (the same seed, `--input-shape` and input files; symbolic dims as 1).
pub(crate) struct FirstSample {
    /// The type and shape to pin each input to, in the models' input order.
    pub(crate) facts: Vec<InputFact>,
    /// What the report says about each input.
    pub(crate) specs: Vec<InputSpec>,
    /// Every input's values, by name.
    pub(crate) data: HashMap<String, Tensor>,
}

/// The inputs the check of `c` against `r` resolves (after checking that their inputs and
/// outputs have the same names), and its first sample as drawn for models it does not upcast
/// (random values are not rounded to a half-precision input's own type).
pub(crate) fn first_sample(
    r: &Signature,
    c: &Signature,
    opts: &VerifyOptions,
    notes: &mut Vec<String>,
) -> Result<FirstSample, Error> {
    super::check_signature(r, c)?;
    let resolved = resolve_inputs(r, c, opts, &BTreeMap::new(), notes)?;
    let data = sample(&resolved, &mut StdRng::seed_from_u64(opts.seed))?;
    Ok(FirstSample {
        facts: resolved.iter().map(|i| i.fact()).collect(),
        specs: resolved.iter().map(|i| i.spec()).collect(),
        data,
    })
}

/// The values the reference's graph fixes for its inputs' symbolic dims (see
/// [`crate::tract::shapes`]), when some input has a symbolic dim that no `--input-shape` or input
/// file sets; else nothing (no analysis).
pub(crate) fn fixed_symbols(
    model: &crate::model::Model,
    sig: &Signature,
    opts: &VerifyOptions,
) -> BTreeMap<String, SymbolValue> {
    let open = sig.inputs.iter().any(|name| {
        let set = opts.input_shapes.iter().any(|(n, _)| n == name)
            || opts.input_files.iter().any(|(n, _)| n == name)
            || opts.inputs_npz.is_some();
        !set && sig.input_decl(name).1.is_some_and(|d| d.iter().any(|d| !matches!(d, DeclDim::Fixed(_))))
    });
    if !open {
        return BTreeMap::new();
    }
    crate::tract::shapes::analyse(model, &opts.input_shapes).symbols
}

/// The inputs both models run at: given shapes and files, declared dims, and for a symbolic dim
/// left open the value the reference's graph fixes (`fixed`, by the dim's name, or
/// `input:axis` when it has none; see [`crate::tract::shapes`]), else 1.
pub(crate) fn resolve_inputs(
    r: &Signature,
    c: &Signature,
    opts: &VerifyOptions,
    fixed: &BTreeMap<String, SymbolValue>,
    notes: &mut Vec<String>,
) -> Result<Vec<ResolvedInput>, Error> {
    let input_err = |s: String| Error::Input(summarize(&s));
    // --input-shape
    let mut shapes: HashMap<&str, &Vec<usize>> = HashMap::new();
    for (name, shape) in &opts.input_shapes {
        if !r.inputs.contains(name) {
            return Err(input_err(format!(
                "--input-shape names `{name}`, which is not an input of the models (inputs: {})",
                r.inputs.join(", ")
            )));
        }
        if shapes.insert(name, shape).is_some() {
            return Err(input_err(format!("--input-shape given twice for `{name}`")));
        }
    }
    // files: --input name=file.npy first, then --inputs file.npz
    let mut files: HashMap<String, (Tensor, String)> = HashMap::new();
    for (name, path) in &opts.input_files {
        if !r.inputs.contains(name) {
            return Err(input_err(format!(
                "--input names `{name}`, which is not an input of the models (inputs: {})",
                r.inputs.join(", ")
            )));
        }
        if files.contains_key(name) {
            return Err(input_err(format!("--input given twice for `{name}`")));
        }
        let t = read_npy_file(path).map_err(|e| input_err(format!("cannot read {}: {e}", path.display())))?;
        files.insert(name.clone(), (t, format!("file {}", path.display())));
    }
    if let Some(npz) = &opts.inputs_npz {
        let names = npz_names(npz).map_err(|e| input_err(format!("cannot read {}: {e}", npz.display())))?;
        let mut used = 0;
        let mut ignored = vec![];
        for a in &names {
            if !r.inputs.contains(a) {
                ignored.push(a.clone());
                continue;
            }
            if files.contains_key(a) {
                notes.push(format!(
                    "input `{a}` taken from --input; the array of the same name in {} is ignored",
                    npz.display()
                ));
                continue;
            }
            let t =
                read_npz_array(npz, a).map_err(|e| input_err(format!("cannot read {}[{a}]: {e}", npz.display())))?;
            files.insert(a.clone(), (t, format!("npz {}[{a}]", npz.display())));
            used += 1;
        }
        if used == 0 && !names.iter().any(|a| files.contains_key(a)) {
            return Err(input_err(format!(
                "{} holds no array named like a model input (inputs: {}; arrays: {})",
                npz.display(),
                r.inputs.join(", "),
                names.join(", ")
            )));
        }
        if !ignored.is_empty() {
            notes.push(format!(
                "arrays of {} that are no model input were ignored: {}",
                npz.display(),
                ignored.join(", ")
            ));
        }
    }

    let mut resolved = vec![];
    for name in &r.inputs {
        let (rdt, rdims) = r.input_decl(name);
        let (cdt, cdims) = c.input_decl(name);
        let file = files.remove(name);
        let dt = match (rdt, cdt) {
            (Some(a), Some(b)) if a != b => {
                return Err(Error::Signature(format!(
                    "input `{name}` is {} in the reference but {} in the candidate",
                    dt_name(a),
                    dt_name(b)
                )))
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => match &file {
                Some((t, _)) => t.datum_type(),
                None => {
                    notes.push(format!("input `{name}` has no declared type; using float32"));
                    DatumType::F32
                }
            },
        };
        if let (Some(a), Some(b)) = (&rdims, &cdims) {
            if a.len() != b.len() {
                return Err(Error::Signature(format!(
                    "input `{name}` has rank {} in the reference but {} in the candidate",
                    a.len(),
                    b.len()
                )));
            }
        }
        // the shape the user asked for, from --input-shape and/or the file
        let mut user: Option<(Vec<usize>, &str)> = shapes.get(name.as_str()).map(|s| ((*s).clone(), "--input-shape"));
        let mut data = None;
        let mut source = String::new();
        if let Some((t, src)) = file {
            let fshape = t.shape().to_vec();
            if let Some((s, _)) = &user {
                if *s != fshape {
                    return Err(input_err(format!(
                        "--input-shape {name}:{} disagrees with the shape {:?} of {}",
                        s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(","),
                        fshape,
                        src.trim_start_matches("file ").trim_start_matches("npz ")
                    )));
                }
            }
            let t = if t.datum_type() == dt {
                t
            } else if (is_float(t.datum_type()) && is_float(dt)) || (is_int(t.datum_type()) && is_int(dt)) {
                notes.push(format!(
                    "input `{name}`: {} is {}, cast to the model's {}",
                    src,
                    dt_name(t.datum_type()),
                    dt_name(dt)
                ));
                t.cast_to_dt(dt).map_err(|e| input_err(chain_msg(&e)))?.into_owned()
            } else {
                return Err(input_err(format!(
                    "input `{name}`: {} holds {} data but the model expects {}",
                    src,
                    dt_name(t.datum_type()),
                    dt_name(dt)
                )));
            };
            user = Some((fshape, "the input file"));
            data = Some(t);
            source = src;
        }
        let decl: Vec<DeclDim> = match (&rdims, &cdims, &user) {
            (Some(a), _, _) => a.clone(),
            (None, Some(b), _) => b.clone(),
            (None, None, Some((s, _))) => vec![DeclDim::Unknown; s.len()],
            (None, None, None) => {
                return Err(input_err(format!(
                    "input `{name}` has no declared shape; give it with --input-shape {name}:d0,d1,..."
                )))
            }
        };
        let other: Vec<DeclDim> = match (&rdims, &cdims) {
            (Some(_), Some(b)) => b.clone(),
            _ => decl.clone(),
        };
        if let Some((s, from)) = &user {
            if s.len() != decl.len() {
                return Err(input_err(format!(
                    "input `{name}` has rank {} but {from} gives shape {:?} (rank {})",
                    decl.len(),
                    s,
                    s.len()
                )));
            }
        }
        let mut shape = vec![];
        for (ix, (a, b)) in decl.iter().zip(other.iter()).enumerate() {
            let d = if let Some((s, from)) = &user {
                let want = s[ix];
                let fixed = |d: &DeclDim| match d {
                    DeclDim::Fixed(v) if *v != want => Some(*v),
                    _ => None,
                };
                let which = match (fixed(a), fixed(b)) {
                    (Some(x), Some(y)) if x == y => Some(format!("both models declare {x}")),
                    (Some(x), Some(y)) => Some(format!("reference declares {x}, candidate {y}")),
                    (Some(x), None) => Some(format!("reference declares {x}")),
                    (None, Some(y)) => Some(format!("candidate declares {y}")),
                    (None, None) => None,
                };
                if let Some(which) = which {
                    notes.push(format!("input `{name}` dim {ix}: {which}, overridden to {want} by {from}"));
                }
                want
            } else {
                match (a, b) {
                    (DeclDim::Fixed(x), DeclDim::Fixed(y)) if x != y => {
                        return Err(Error::Signature(format!(
                            "input `{name}` dim {ix} is {x} in the reference but {y} in the candidate \
                             (choose one with --input-shape)"
                        )))
                    }
                    (DeclDim::Fixed(x), DeclDim::Fixed(_)) => *x,
                    (DeclDim::Fixed(x), other) | (other, DeclDim::Fixed(x)) => {
                        let (sym_side, fixed_side) = if matches!(a, DeclDim::Fixed(_)) {
                            ("candidate", "reference")
                        } else {
                            ("reference", "candidate")
                        };
                        let what = match other {
                            DeclDim::Symbol(s) => format!("symbolic (`{s}`)"),
                            _ => "unknown".to_string(),
                        };
                        notes.push(format!(
                            "input `{name}` dim {ix} is {what} in the {sym_side}; using {x} as \
                             declared by the {fixed_side} (set it with --input-shape {name}:...)"
                        ));
                        *x
                    }
                    (a, b) => {
                        let (sym, key) = match (a, b) {
                            (DeclDim::Symbol(s), _) | (_, DeclDim::Symbol(s)) => (format!(" (`{s}`)"), s.clone()),
                            _ => (String::new(), format!("{name}:{ix}")),
                        };
                        match fixed.get(&key) {
                            Some(SymbolValue { value, fixed: Fixed::ByReshape { node, to } }) => {
                                notes.push(format!(
                                    "input `{name}` dim {ix}{sym} is symbolic; using {value}, which the graph fixes \
                                     (Reshape '{node}' to {to:?}; set it with --input-shape {name}:...)"
                                ));
                                *value
                            }
                            _ => {
                                notes.push(format!(
                                    "input `{name}` dim {ix}{sym} is symbolic; defaulting to 1 \
                                     (set it with --input-shape {name}:...)"
                                ));
                                1
                            }
                        }
                    }
                }
            };
            shape.push(d);
        }
        if data.is_none() {
            source = if is_float(dt) {
                format!("random normal (seed {})", opts.seed)
            } else if dt == DatumType::Bool {
                format!("random bool (seed {})", opts.seed)
            } else {
                format!("random integers 0..=3 (seed {})", opts.seed)
            };
        }
        resolved.push(ResolvedInput { name: name.clone(), dt, shape, data, source, stored: None });
    }
    Ok(resolved)
}

/// Most elements a random input of the check may have (4 GiB as float32). A shape in a model is
/// a declared size like any other: a file of a few KB must not make the check allocate
/// terabytes (an allocation failure aborts the process; it is not an error).
pub const MAX_INPUT_ELEMENTS: u128 = 1 << 30;

/// The random inputs the check would make for `model`, by its declared input shapes (symbolic
/// dims as 1, `--input-shape` overriding): the first of more than [`MAX_INPUT_ELEMENTS`], as a
/// message naming it.
pub(crate) fn check_declared_sizes(model: &crate::model::Model, opts: &VerifyOptions) -> Result<(), String> {
    if opts.inputs_npz.is_some() {
        return Ok(());
    }
    let g = model.graph();
    for v in g.input.iter().filter(|v| !g.initializer.iter().any(|t| t.name() == v.name())) {
        if opts.input_files.iter().any(|(n, _)| n == v.name()) {
            continue;
        }
        let dims: Vec<u128> = match opts.input_shapes.iter().find(|(n, _)| n == v.name()) {
            Some((_, d)) => d.iter().map(|&x| x as u128).collect(),
            None => match crate::graph::declared_dims(v) {
                Some(dims) => dims.iter().map(|d| d.filter(|&x| x >= 0).unwrap_or(1) as u128).collect(),
                None => continue,
            },
        };
        let n = dims.iter().try_fold(1u128, |a, &d| a.checked_mul(d)).unwrap_or(u128::MAX);
        if n > MAX_INPUT_ELEMENTS {
            return Err(format!(
                "input '{}' of shape {dims:?} has {n} elements, too many to check (at most {MAX_INPUT_ELEMENTS})",
                v.name()
            ));
        }
    }
    Ok(())
}

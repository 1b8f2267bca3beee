//! The per-dtype dispatch of every custom CPU op, written once: [`dispatch!`](crate::dispatch)
//! matches the operands' storages, binds each to its typed slice and wraps the result in the
//! storage of the same type. The float types the kernels run in are the arms of that one macro,
//! so a new dtype is one more arm in each of its three forms, not one more copy in every op.
//! Exported (hidden from the docs) for the custom ops of the other crates.

use candle_core::{Layout, Result, bail};

pub use candle_core::CpuStorage;

/// The contiguous part of `data` that layout `l` covers; op `op` refuses strided operand `what`.
pub fn slice<'a, T>(data: &'a [T], l: &Layout, op: &str, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{op}: {what} must be contiguous"),
    }
}

/// [`slice`], mutable (the target of an in-place op).
pub fn slice_mut<'a, T>(
    data: &'a mut [T],
    l: &Layout,
    op: &str,
    what: &str,
) -> Result<&'a mut [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut data[a..b]),
        None => bail!("{op}: {what} must be contiguous"),
    }
}

/// Refuses operands of op `op` whose shapes differ (element-wise ops).
pub fn same_dims(op: &str, a: &Layout, b: &Layout) -> Result<()> {
    if a.dims() != b.dims() {
        bail!("{op}: shapes {:?} and {:?} differ", a.dims(), b.dims())
    }
    Ok(())
}

/// The error for operands of a dtype no arm takes, or of mixed dtypes.
pub fn unsupported<T>(op: &str) -> Result<T> {
    bail!("{op}: only f32 and f64 are supported, with one dtype for all operands")
}

/// Runs a body per float dtype over CPU storages, in three forms:
///
/// * `dispatch!(name, (s1, l1, s2, l2), |a, b| body)`: each storage bound to its contiguous
///   typed slice; `body` gives `(Vec<T>, Shape)`; the result is `Ok((CpuStorage, Shape))`.
/// * `dispatch!(raw name, (s1, s2), |a, b| body)`: each bound to its whole `&Vec<T>` (the
///   op reads its layouts itself); `body` gives `Result<(Vec<T>, Shape)>`.
/// * `dispatch!(mut name, (s1, l1, s2, l2), |a, b| body)`: in place on the first (`&mut [T]`),
///   the others read; `body` gives `()`; the result is `Ok(())`.
///
/// Every form refuses other dtypes and mixed dtypes by the op's name.
#[macro_export]
#[doc(hidden)]
macro_rules! dispatch {
    (raw $name:expr, ($($s:ident),+), |$($v:ident),+| $body:expr) => {{
        use $crate::dtype::CpuStorage as S;
        match ($($s,)+) {
            ($(S::F32($v),)+) => { let (o, sh) = $body?; Ok((S::F32(o), sh)) }
            ($(S::F64($v),)+) => { let (o, sh) = $body?; Ok((S::F64(o), sh)) }
            _ => $crate::dtype::unsupported($name),
        }
    }};
    (mut $name:expr, ($s0:ident, $l0:ident $(, $s:ident, $l:ident)*), |$v0:ident $(, $v:ident)*| $body:expr) => {{
        use $crate::dtype::CpuStorage as S;
        match ($s0, $($s,)*) {
            (S::F32($v0), $(S::F32($v),)*) => {
                let $v0 = $crate::dtype::slice_mut($v0, $l0, $name, stringify!($v0))?;
                $(let $v = $crate::dtype::slice($v, $l, $name, stringify!($v))?;)*
                $body;
                Ok(())
            }
            (S::F64($v0), $(S::F64($v),)*) => {
                let $v0 = $crate::dtype::slice_mut($v0, $l0, $name, stringify!($v0))?;
                $(let $v = $crate::dtype::slice($v, $l, $name, stringify!($v))?;)*
                $body;
                Ok(())
            }
            _ => $crate::dtype::unsupported($name),
        }
    }};
    ($name:expr, ($($s:ident, $l:ident),+), |$($v:ident),+| $body:expr) => {{
        use $crate::dtype::CpuStorage as S;
        match ($($s,)+) {
            ($(S::F32($v),)+) => {
                $(let $v = $crate::dtype::slice($v, $l, $name, stringify!($v))?;)+
                let (o, sh) = $body;
                Ok((S::F32(o), sh))
            }
            ($(S::F64($v),)+) => {
                $(let $v = $crate::dtype::slice($v, $l, $name, stringify!($v))?;)+
                let (o, sh) = $body;
                Ok((S::F64(o), sh))
            }
            _ => $crate::dtype::unsupported($name),
        }
    }};
}

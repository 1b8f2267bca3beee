//! What the CPU the process runs on offers, read once at run time: its vector instruction set
//! (which micro-kernels run) and its cache sizes (how work is blocked). Nothing is fixed at build
//! time, so one binary suits laptops, AMD and Intel servers alike.

use std::sync::OnceLock;

/// A vector instruction set with a direct-convolution micro-kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// 512-bit vectors, 32 registers (`avx512f`).
    Avx512,
    /// 256-bit vectors, 16 registers (`avx2` and `fma`).
    Avx2,
}

impl Isa {
    /// f32 lanes per vector.
    pub fn lanes(self) -> usize {
        match self {
            Isa::Avx512 => 16,
            Isa::Avx2 => 8,
        }
    }

    /// Vectors of output channels in the widest register tile: 6 positions x 4 vectors (24
    /// accumulators + 4 weights + 1 broadcast of 32 zmm registers), or 6 x 2 (12 + 2 + 1 of 16
    /// ymm registers).
    pub fn max_vectors(self) -> usize {
        match self {
            Isa::Avx512 => 4,
            Isa::Avx2 => 2,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
        }
    }
}

/// Every instruction set of [`Isa`] this CPU has, widest first.
pub fn vector_isas() -> Vec<Isa> {
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            v.push(Isa::Avx512);
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            v.push(Isa::Avx2);
        }
    }
    v
}

/// The instruction set the kernels use: the widest this CPU has, or at most the one named by
/// `RETINANET_ISA` (`avx2`, `avx512`; `none` for none), to compare kernels on one machine. A
/// value that names no instruction set is reported once and ignored.
pub fn vector_isa() -> Option<Isa> {
    static ISA: OnceLock<Option<Isa>> = OnceLock::new();
    *ISA.get_or_init(|| {
        let have = vector_isas();
        let cap = match std::env::var("RETINANET_ISA") {
            Ok(v) => match v.to_ascii_lowercase().as_str() {
                "none" => return None,
                "avx2" => Some(Isa::Avx2),
                "avx512" => Some(Isa::Avx512),
                other => {
                    eprintln!(
                        "warning: RETINANET_ISA={other:?} names no instruction set \
                         (avx512, avx2, none); using the CPU's widest"
                    );
                    None
                }
            },
            Err(_) => None,
        };
        match cap {
            Some(Isa::Avx2) => have.into_iter().find(|&i| i == Isa::Avx2),
            _ => have.first().copied(),
        }
    })
}

/// Whether the CPU computes bf16 dot products in hardware (`avx512_bf16`: Zen 4 and later,
/// Intel Cooper Lake, Sapphire Rapids and later).
pub fn has_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The CPU's model name (`/proc/cpuinfo`), for messages and reports; `None` where it cannot be
/// read.
pub fn model_name() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Size in bytes of the level-`level` data (or unified) cache of CPU 0, from sysfs.
fn cache_bytes(level: u32) -> Option<usize> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    // `index0`, `index1`, ...; other entries (`uevent`) have no level and are passed over.
    dir.flatten().find_map(|e| entry_bytes(&e.path(), level))
}

/// The size of the cache described by sysfs folder `p` if it is a level-`level` data or unified
/// cache.
fn entry_bytes(p: &std::path::Path, level: u32) -> Option<usize> {
    let read = |f: &str| std::fs::read_to_string(p.join(f)).ok();
    let lv: u32 = read("level")?.trim().parse().ok()?;
    if lv != level || read("type")?.trim() == "Instruction" {
        return None;
    }
    parse_size(read("size")?.trim())
}

/// `"512K"`, `"32M"`, `"4096"` in bytes.
fn parse_size(s: &str) -> Option<usize> {
    let (num, mul) = match s.strip_suffix('K') {
        Some(n) => (n, 1 << 10),
        None => match s.strip_suffix('M') {
            Some(n) => (n, 1 << 20),
            None => (s, 1),
        },
    };
    num.parse::<usize>().ok().map(|n| n * mul)
}

/// L2 size of one core in bytes (sysfs; 1 MiB where it cannot be read), kept within
/// 256 KiB..8 MiB so that a misreported value cannot make a block absurd.
pub fn l2_bytes() -> usize {
    static L2: OnceLock<usize> = OnceLock::new();
    *L2.get_or_init(|| cache_bytes(2).unwrap_or(1 << 20).clamp(256 << 10, 8 << 20))
}

/// L1 data cache of one core in bytes (sysfs; 32 KiB where it cannot be read), kept within
/// 16..256 KiB.
pub fn l1d_bytes() -> usize {
    static L1: OnceLock<usize> = OnceLock::new();
    *L1.get_or_init(|| {
        cache_bytes(1)
            .unwrap_or(32 << 10)
            .clamp(16 << 10, 256 << 10)
    })
}

/// One line on what the kernels found: instruction set, bf16, L1d and L2 sizes, and (after
/// some work) what the measured choices took: instruction sets where the CPU has several,
/// weight-gradient position blocks; and how often transformed kernels were reused (for
/// benchmark reports).
pub fn summary() -> String {
    let kib = |b: Option<usize>| b.map_or("?".to_string(), |b| format!("{} KiB", b >> 10));
    let mut s = format!(
        "kernels: {}, bf16 {}, L1d {}, L2 {}",
        vector_isa().map_or("scalar (no AVX2 + FMA)", Isa::name),
        if has_bf16() { "yes" } else { "no" },
        kib(cache_bytes(1)),
        kib(cache_bytes(2)),
    );
    if let Some(t) = crate::direct::tuning_summary() {
        s.push_str(&format!("; {t}"));
    }
    if let Some(t) = crate::reuse::summary() {
        s.push_str(&format!("; {t}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_machine() {
        // The lane counts and tiles are what the kernels' register budgets assume.
        assert_eq!(Isa::Avx512.lanes() * Isa::Avx512.max_vectors(), 64);
        assert_eq!(Isa::Avx2.lanes() * Isa::Avx2.max_vectors(), 16);
        let isas = vector_isas();
        if let Some(i) = vector_isa() {
            assert!(isas.contains(&i));
        }
        let l2 = l2_bytes();
        assert!((16 << 10..=256 << 10).contains(&l1d_bytes()));
        assert!((256 << 10..=8 << 20).contains(&l2));
        if let Some(b) = cache_bytes(2) {
            assert!(b >= 64 << 10, "an L2 of {b} bytes");
        }
        assert!(summary().starts_with("kernels: "));
        assert_eq!(parse_size("512K"), Some(512 << 10));
        assert_eq!(parse_size("32M"), Some(32 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("12x"), None);
        // Where sysfs describes the caches, both levels are found (not only the first entry).
        if std::path::Path::new("/sys/devices/system/cpu/cpu0/cache/index2/size").exists() {
            assert!(cache_bytes(1).is_some() && cache_bytes(2).is_some());
        }
    }
}

//! What the crates' tests share. [`fuzz`]: inputs for the property tests of the parsers that
//! read user files (list files, VOC XML, COCO JSON, detections files, configs, checkpoints) —
//! arbitrary bytes, and valid files mutated by insertions, deletions, replaced bytes,
//! truncation, doubled lines and format-specific tokens.

/// Fuzzing inputs; see the crate documentation.
pub mod fuzz {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};

    /// How one mutation changes a file.
    #[derive(Debug, Clone)]
    pub enum Mutation {
        /// These bytes at a position.
        Insert(usize, Vec<u8>),
        /// Token `.1` of the list at a position.
        Token(usize, usize),
        /// Up to `.1` bytes removed at a position.
        Delete(usize, usize),
        /// One byte replaced.
        Replace(usize, u8),
        /// The file cut at a position.
        Truncate(usize),
        /// One line written twice.
        DuplicateLine(usize),
    }

    /// One random mutation; `Token` inserts one of `tokens`.
    pub fn mutation(tokens: &'static [&'static str]) -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (any::<usize>(), prop::collection::vec(any::<u8>(), 1..4))
                .prop_map(|(p, b)| Mutation::Insert(p, b)),
            (any::<usize>(), 0..tokens.len().max(1)).prop_map(|(p, t)| Mutation::Token(p, t)),
            (any::<usize>(), 1..12usize).prop_map(|(p, n)| Mutation::Delete(p, n)),
            (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Replace(p, b)),
            any::<usize>().prop_map(Mutation::Truncate),
            any::<usize>().prop_map(Mutation::DuplicateLine),
        ]
    }

    /// `seed` with the mutations applied in order (positions wrap around the current length).
    pub fn apply(seed: &[u8], muts: &[Mutation], tokens: &[&str]) -> Vec<u8> {
        let mut v = seed.to_vec();
        for m in muts {
            let at = |p: usize, v: &Vec<u8>| p % (v.len() + 1);
            match m {
                Mutation::Insert(p, b) => {
                    let i = at(*p, &v);
                    v.splice(i..i, b.iter().copied());
                }
                Mutation::Token(p, t) => {
                    let i = at(*p, &v);
                    if let Some(tok) = tokens.get(*t) {
                        v.splice(i..i, tok.bytes());
                    }
                }
                Mutation::Delete(p, n) => {
                    let i = at(*p, &v);
                    let j = (i + n).min(v.len());
                    v.drain(i..j);
                }
                Mutation::Replace(p, b) => {
                    if !v.is_empty() {
                        let i = p % v.len();
                        v[i] = *b;
                    }
                }
                Mutation::Truncate(p) => {
                    let i = at(*p, &v);
                    v.truncate(i);
                }
                Mutation::DuplicateLine(p) => {
                    let lines: Vec<&[u8]> = v.split(|&b| b == b'\n').collect();
                    let k = p % lines.len();
                    let mut out = Vec::new();
                    for (i, l) in lines.iter().enumerate() {
                        out.extend_from_slice(l);
                        out.push(b'\n');
                        if i == k {
                            out.extend_from_slice(l);
                            out.push(b'\n');
                        }
                    }
                    v = out;
                }
            }
        }
        v
    }

    /// A third arbitrary bytes, the rest 1-5 mutations of `seed` (with `tokens` inserted).
    pub fn inputs(
        seed: &'static [u8],
        tokens: &'static [&'static str],
    ) -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            1 => prop::collection::vec(any::<u8>(), 0..300),
            2 => prop::collection::vec(mutation(tokens), 1..6)
                .prop_map(move |m| apply(seed, &m, tokens)),
        ]
    }

    /// Runs `check` on `cases` inputs from `seed`; returns how many were tried in all by this
    /// process (printed too, as the tests report their totals).
    pub fn run(
        seed: &'static [u8],
        tokens: &'static [&'static str],
        cases: u32,
        check: impl Fn(&[u8]) -> Result<(), TestCaseError>,
    ) -> usize {
        static TRIED: AtomicUsize = AtomicUsize::new(0);
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        });
        runner
            .run(&inputs(seed, tokens), |bytes| {
                TRIED.fetch_add(1, Ordering::Relaxed);
                check(&bytes)
            })
            .unwrap();
        let n = TRIED.load(Ordering::Relaxed);
        eprintln!("fuzz: {n} inputs tried so far in this binary");
        n
    }
}

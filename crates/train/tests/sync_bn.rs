//! SyncBatchNorm and the gradient all-reduce in double precision, on an in-process world of two
//! thread ranks: each rank's half of the batch gives exactly (to 1e-12) the outputs and input
//! gradients of one batch norm over the whole batch, and the ranks' weight and bias gradients
//! sum to the whole batch's.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use retinanet_kernels::{SumReducer, batch_norm_train, batch_norm_train_synced};
use retinanet_train::dist::threads::ThreadComm;
use retinanet_train::dist::{Communicator, StatsReducer, all_reduce_grads};

fn values(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 1.5
        })
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a: Vec<f64> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f64> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    a.iter().zip(&b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

/// Batch norm of `x` and the gradients of `sum(y * r)`: `(y, dx, dw, db, mean, var, count)`.
fn run(
    x: &Tensor,
    r: &Tensor,
    reducer: Option<Arc<dyn SumReducer>>,
) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, usize) {
    let c = x.dim(1).unwrap();
    let dev = Device::Cpu;
    let xv = Var::from_tensor(x).unwrap();
    let w = Var::from_tensor(&Tensor::new(values(c, 7).as_slice(), &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::new(values(c, 8).as_slice(), &dev).unwrap()).unwrap();
    let out = match reducer {
        Some(red) => batch_norm_train_synced(&xv, &w, &b, 1e-5, Some(red)).unwrap(),
        None => batch_norm_train(&xv, &w, &b, 1e-5).unwrap(),
    };
    let loss = (&out.y * r).unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    (
        out.y.clone(),
        g.get(&xv).unwrap().clone(),
        g.get(&w).unwrap().clone(),
        g.get(&b).unwrap().clone(),
        out.mean,
        out.var,
        out.count,
    )
}

#[test]
fn two_thread_ranks_normalise_and_differentiate_as_one_batch() {
    for (batch, c, h, w) in [(8, 3, 5, 4), (6, 5, 1, 1), (2, 4, 7, 3)] {
        let dev = Device::Cpu;
        let n = batch * c * h * w;
        let x = Tensor::from_vec(values(n, 1), (batch, c, h, w), &dev).unwrap();
        // An uneven mean per channel, so the two-pass variance matters.
        let x = x
            .broadcast_add(
                &Tensor::new(&[3.0f64, -2.0, 50.0, 0.5, 1.0][..c], &dev)
                    .unwrap()
                    .reshape((1, c, 1, 1))
                    .unwrap(),
            )
            .unwrap();
        let r = Tensor::from_vec(values(n, 2), (batch, c, h, w), &dev).unwrap();
        let whole = run(&x, &r, None);

        let comms = ThreadComm::world(2);
        let half = batch / 2;
        let parts: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    let (x, r) = (x.clone(), r.clone());
                    s.spawn(move || {
                        let k = comm.rank();
                        let xs = x.narrow(0, k * half, half).unwrap().contiguous().unwrap();
                        let rs = r.narrow(0, k * half, half).unwrap().contiguous().unwrap();
                        let comm: Arc<dyn Communicator> = Arc::new(comm);
                        run(&xs, &rs, Some(Arc::new(StatsReducer(comm))))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (k, p) in parts.iter().enumerate() {
            let y = whole.0.narrow(0, k * half, half).unwrap();
            let dx = whole.1.narrow(0, k * half, half).unwrap();
            assert!(max_diff(&p.0, &y) < 1e-12, "rank {k}: outputs");
            assert!(
                max_diff(&p.1, &dx) < 1e-12,
                "rank {k}: input gradients {}",
                max_diff(&p.1, &dx)
            );
            assert!(max_diff(&p.4, &whole.4) < 1e-12 && max_diff(&p.5, &whole.5) < 1e-12);
            assert_eq!(p.6, batch * h * w, "the count is the global batch's");
        }
        let dw = (&parts[0].2 + &parts[1].2).unwrap();
        let db = (&parts[0].3 + &parts[1].3).unwrap();
        assert!(
            max_diff(&dw, &whole.2) < 1e-12,
            "weight gradients sum to the whole batch's"
        );
        assert!(
            max_diff(&db, &whole.3) < 1e-12,
            "bias gradients sum to the whole batch's"
        );
        // Each rank's own weight gradient is not the whole batch's (the sums are per rank).
        assert!(max_diff(&parts[0].2, &whole.2) > 1e-6);
    }
}

#[test]
fn gradients_are_summed_over_thread_ranks_in_place() {
    let comms = ThreadComm::world(3);
    let results: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                s.spawn(move || {
                    let dev = Device::Cpu;
                    let k = comm.rank() as f32;
                    let a =
                        Var::from_tensor(&Tensor::new(&[1.0f32, 2.0, 3.0], &dev).unwrap()).unwrap();
                    let b = Var::zeros((2, 2), DType::F32, &dev).unwrap();
                    // d/da = (k + 1), d/db = 2 (k + 1) b + (k + 1).
                    let loss = ((a.as_tensor().sum_all().unwrap() * (k + 1.0) as f64).unwrap()
                        + ((b.as_tensor().sqr().unwrap() + b.as_tensor())
                            .unwrap()
                            .sum_all()
                            .unwrap()
                            * (k + 1.0) as f64)
                            .unwrap())
                    .unwrap();
                    let mut g = loss.backward().unwrap();
                    let vars = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
                    all_reduce_grads(&comm, &mut g, &vars).unwrap();
                    vec![
                        g.get(&a).unwrap().to_vec1::<f32>().unwrap(),
                        g.get(&b)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap(),
                    ]
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        assert_eq!(r[0], vec![6.0, 6.0, 6.0]);
        assert_eq!(r[1], vec![6.0; 4]);
    }
}

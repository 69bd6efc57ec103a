//! The Probabilistic Task Locator on synthetic features: batched scores equal per-VAE scores,
//! z-scores equal their definition, and well-separated tasks are located correctly.

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Tensor};
use cmoe_moe::ptl::{BankEntry, PrimitiveBank, StackedVaes, TaskVae, TaskVaeConfig};

const D: usize = 16;
const TASKS: usize = 3;

/// Features of task `t`: a Gaussian blob around its own centre.
fn features<Be: Backend>(task: usize, n: usize, device: &Be::Device) -> Tensor<Be, 2> {
    let mut centre = vec![0f32; D];
    for (i, c) in centre.iter_mut().enumerate() {
        *c = if i % TASKS == task { 3.0 } else { -1.0 } * (1.0 + (i / TASKS) as f32 * 0.1);
    }
    let centre = Tensor::<Be, 1>::from_floats(centre.as_slice(), device).unsqueeze_dim::<2>(0);
    Tensor::random([n, D], Distribution::Normal(0.0, 0.5), device) + centre
}

fn train_vae<AD: AutodiffBackend>(task: usize, device: &AD::Device) -> TaskVae<AD::InnerBackend> {
    let mut vae: TaskVae<AD> = TaskVaeConfig::new(D)
        .with_hidden(32)
        .with_latent(4)
        .init(device);
    let mut optim = AdamConfig::new().init();
    for _ in 0..300 {
        let loss = vae.loss(features::<AD>(task, 64, device), 4);
        let total = loss.rec + loss.kl * 1e-2;
        let grads = GradientsParams::from_grads(total.backward(), &vae);
        vae = optim.step(5e-3, vae, grads);
    }
    vae.valid()
}

fn locator_finds_the_task<AD: AutodiffBackend>() {
    type B<AD> = <AD as AutodiffBackend>::InnerBackend;
    let device = Default::default();
    AD::seed(&device, 7);
    let vaes: Vec<TaskVae<B<AD>>> = (0..TASKS).map(|t| train_vae::<AD>(t, &device)).collect();
    let eps = Tensor::<B<AD>, 2>::random([8, 4], Distribution::Normal(0.0, 1.0), &device);
    let stacked = StackedVaes::new(&vaes.iter().collect::<Vec<_>>(), eps.clone());

    // Bank: score statistics on each task's last training-like instances.
    let bank = PrimitiveBank {
        entries: (0..TASKS)
            .map(|t| {
                let scores = vaes[t].log_likelihood(features::<B<AD>>(t, 64, &device), eps.clone());
                BankEntry::from_scores(&scores.into_data().iter::<f64>().collect::<Vec<_>>())
            })
            .collect(),
    };

    let mut correct = 0;
    let mut total = 0;
    for task in 0..TASKS {
        let x = features::<B<AD>>(task, 40, &device);
        let location = stacked.locate(x.clone(), &bank);
        for (t, vae) in vaes.iter().enumerate() {
            // Batched scores equal each VAE's own computation with the same draws.
            let direct: Vec<f64> = vae
                .log_likelihood(x.clone(), eps.clone())
                .into_data()
                .iter::<f64>()
                .collect();
            for (i, d) in direct.iter().enumerate() {
                let batched = location.log_likelihoods[i][t];
                assert!(
                    (batched - d).abs() <= 1e-3 * d.abs().max(1.0),
                    "task {t}: {batched} vs {d}"
                );
                let z = (d - bank.entries[t].mean) / bank.entries[t].std;
                assert!((location.z_scores[i][t] - z).abs() <= 1e-3 * z.abs().max(1.0));
            }
        }
        correct += location.tasks.iter().filter(|&&t| t == task).count();
        total += location.tasks.len();
    }
    assert!(
        correct as f64 / total as f64 >= 0.98,
        "located {correct} / {total}"
    );
}

#[test]
fn flex_locator_finds_the_task_and_its_scores_are_the_definition() {
    locator_finds_the_task::<Autodiff<burn_flex::Flex>>();
}

#[test]
fn ndarray_locator_finds_the_task_and_its_scores_are_the_definition() {
    locator_finds_the_task::<Autodiff<burn_ndarray::NdArray>>();
}

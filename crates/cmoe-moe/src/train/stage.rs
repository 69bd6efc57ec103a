//! The training loop of a stage, generic over `B: AutodiffBackend`.
//!
//! The initial experts and a router are trained first, in their own phase (or by task 0 when
//! there is no such phase). Then each task t (from task 0 after an initial phase):
//! 1. [`add_probes`]: `N_p` probe experts per layer (the mean of the layer's experts) and a
//!    probe router = the previous router (router_{t-1}, or the initial phase's) + random
//!    columns; only probes and that router train ([`train_stage`] on the probe subset).
//! 2. [`activation_stats`] on a disjoint eval subset; [`crate::pgke::plan_from_stats`].
//! 3. [`expand`]: probes dropped, each selected layer gets its new experts (copies of the most
//!    activated expert), router_t = the previous router + random columns; only those train.
//!
//! The main stage of every task also fits the task's VAE in the same loss ([`train_stage_with`]),
//! on the frozen base's features ([`batch_features`]), and [`bank_entry`] then scores the task's
//! last training instances for the primitive bank. Batches come from a [`BatchSource`].

use burn::module::{AutodiffModule, Module};
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;

use super::data_parallel::Replicas;
use super::freeze::trainable_experts;
use super::noise::NoiseStream;
use super::{
    BatchSource, LossTerms, LossValues, Penalty, StageConfig, StageControl, StageError,
    StageSnapshot, StageState, TrainBatch, adamw, by_id, by_order, learning_rate,
};
use crate::host::{AutodiffHost, MoeHost};
use crate::model::CmoeModel;
use crate::ptl::{PtlFeature, TaskVae, VaeFit, batch_features};

/// Optimises the trainable parameters for `config.steps` steps over `source`'s batches with
/// task `task`'s routers on `CE + kappa * aux`; `on_step` sees every step's loss terms.
pub fn train_stage<B: AutodiffBackend, H: AutodiffHost<B>>(
    model: CmoeModel<B, H>,
    task: usize,
    source: &mut dyn BatchSource<B>,
    config: &StageConfig,
    on_step: impl FnMut(usize, &LossValues),
) -> Result<CmoeModel<B, H>, StageError> {
    let control = StageControl::none();
    train_stage_with(model, None, task, source, config, control, on_step).map(|(model, _)| model)
}

/// [`train_stage`] on the full objective `CE + lambda KL + eta rec + kappa aux` when `vae` is
/// given: the VAE's parameters are disjoint from the experts', each set has its own AdamW
/// state, and both step on the gradients of one backward pass. Batches are read from `source`
/// as the steps need them: step `s` takes the next `config.accumulation` micro-batches.
/// `control` says where to start (a resumed stage skips the batches its steps consumed) and
/// when to checkpoint.
pub fn train_stage_with<B: AutodiffBackend, H: AutodiffHost<B>>(
    mut model: CmoeModel<B, H>,
    mut vae: Option<VaeFit<B>>,
    task: usize,
    source: &mut dyn BatchSource<B>,
    config: &StageConfig,
    mut control: StageControl<'_, B, H>,
    mut on_step: impl FnMut(usize, &LossValues),
) -> Result<(CmoeModel<B, H>, Option<VaeFit<B>>), StageError> {
    if source.is_empty() {
        return Err(StageError::NoData);
    }
    let optimizer = adamw(config.weight_decay);
    let mut optim = optimizer.init();
    let mut vae_optim = optimizer.init();
    let micro = config.accumulation.max(1);
    let mut start = 0;
    let mut batches_read = 0;
    if let Some(state) = control.resume.take() {
        optim = optim.load_record(by_id(state.optim, &model));
        if let Some(fit) = &vae {
            vae_optim = vae_optim.load_record(by_id(state.vae_optim, &fit.vae));
        }
        source.skip(state.batches_read)?;
        batches_read = state.batches_read;
        start = state.step;
    }
    let device = model.devices().into_iter().next().unwrap_or_default();
    check_devices(&device, &control, micro)?;
    let mut replicas = Replicas::new(&model, vae.as_ref().map(|fit| &fit.vae), control.devices);
    let trained = trainable_experts(&model);
    for step in start..config.steps {
        let step_seed = config
            .seed
            .map(|seed| seed ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        if let Some(step_seed) = step_seed {
            seed_devices(&replicas, &device, step_seed);
        }
        let lr = learning_rate(step, config.steps, config.lr, config.warmup_ratio);
        let (positions, shards) = deal(source, vae.as_ref(), &replicas, micro, &mut batches_read)?;
        let vae_settings = vae
            .as_ref()
            .map(|fit| (fit.config.n_rep, fit.config.feature));
        let shard_context = ShardContext {
            task,
            config,
            micro,
            step,
            lr,
            penalty: control.penalty,
            trained: &trained,
            noise_seed: replicas
                .share_a_device()
                .then(|| step_seed.unwrap_or_else(rand::random)),
        };
        let outputs = replicas.run(
            &model,
            vae.as_ref().map(|fit| &fit.vae),
            shards,
            |model, vae, shard| shard_context.run(model, vae.zip(vae_settings), shard),
        );
        let Gathered {
            values,
            computed,
            model_grads,
            vae_grads,
        } = gather(outputs, micro, &device)?;
        if let Some(fit) = &mut vae {
            for ((position, held), computed) in positions.into_iter().zip(computed) {
                if let Some(features) = held.or(computed) {
                    fit.memory.insert(position, features);
                }
            }
        }
        let mut mean = LossValues::default();
        for v in &values {
            mean.add_scaled(v, 1.0 / micro as f64);
        }
        on_step(step, &mean);
        if config.router_lr_scale == 1.0 {
            model = replicas.step(&mut optim, lr, model, model_grads);
        } else {
            // Two steps of the one optimiser on disjoint parameters: AdamW's state is per
            // parameter, so this is one step with the routers at their own learning rate.
            let mut model_grads = model_grads;
            let router_grads = take_router_grads::<B, H>(&model, &mut model_grads);
            model = replicas.step(&mut optim, lr, model, model_grads);
            let router_lr = lr * config.router_lr_scale;
            model = replicas.step(&mut optim, router_lr, model, router_grads);
        }
        if let Some(mut fit) = vae.take() {
            let vae_lr = fit.config.lr.map_or(lr, |peak| {
                learning_rate(step, config.steps, peak, config.warmup_ratio)
            });
            fit.vae = replicas.step(&mut vae_optim, vae_lr, fit.vae, vae_grads);
            vae = Some(fit);
        }
        replicas.refresh(&model, vae.as_ref().map(|fit| &fit.vae));
        let done = step + 1;
        if let Some(save) = control.save.as_mut()
            && control.every > 0
            && done % control.every == 0
            && done < config.steps
        {
            let state = StageState {
                step: done,
                batches_read,
                optim: by_order(optim.to_record(), &model),
                vae_optim: vae
                    .as_ref()
                    .map(|fit| by_order(vae_optim.to_record(), &fit.vae))
                    .unwrap_or_default(),
            };
            save(StageSnapshot {
                model: &model,
                vae: vae.as_ref(),
                state,
            })?;
        }
    }
    if let Some(seed) = config.seed {
        // What is drawn after the stage (new experts, router columns) depends on the seed
        // alone, not on how many draws the stage made from the device's generator (none when
        // replicas drew from their own streams).
        B::seed(&device, seed ^ 0x94D0_49BB_1331_11EB);
    }
    Ok((model, vae))
}

/// Moves the routers' gradients out of each device's `grads` into a set of their own.
fn take_router_grads<B: AutodiffBackend, H: Module<B>>(
    model: &CmoeModel<B, H>,
    grads: &mut [GradientsParams],
) -> Vec<GradientsParams> {
    let ids: Vec<_> = model
        .moe
        .iter()
        .flat_map(|layer| layer.routers.routers.iter().chain(&layer.routers.initial))
        .map(|router| router.weight.id)
        .collect();
    grads
        .iter_mut()
        .map(|grads| {
            let mut routers = GradientsParams::new();
            for &id in &ids {
                if let Some(grad) = grads.remove::<B::InnerBackend, 2>(id) {
                    routers.register(id, grad);
                }
            }
            routers
        })
        .collect()
}

/// Refuses devices a stage cannot use: a first device that is not the model's, several devices
/// for a regularised baseline, more devices than micro-batches per step.
fn check_devices<B: AutodiffBackend, H: Module<B>>(
    device: &B::Device,
    control: &StageControl<'_, B, H>,
    micro: usize,
) -> Result<(), StageError> {
    if let Some(first) = control.devices.first()
        && first != device
    {
        return Err(StageError::Config(format!(
            "the model is on {device:?}, not on the first training device {first:?}"
        )));
    }
    if control.penalty.is_some() && control.devices.len() > 1 {
        return Err(StageError::Config(
            "a regularised baseline (EWC, LwF) trains on one device".into(),
        ));
    }
    let count = control.devices.len().max(1);
    if count > micro {
        return Err(StageError::Config(format!(
            "{count} devices need at least as many micro-batches per step (accumulation is {micro})"
        )));
    }
    Ok(())
}

/// Seeds the step's draws: the first device from `step_seed`, every other distinct device its
/// own stream (replicas sharing the first device share its generator).
fn seed_devices<B: AutodiffBackend, H: MoeHost<B>>(
    replicas: &Replicas<B, H>,
    device: &B::Device,
    step_seed: u64,
) {
    B::seed(device, step_seed);
    for d in 1..replicas.count() {
        if let Some(other) = replicas.device(d).filter(|&o| o != device) {
            B::seed(
                other,
                step_seed ^ (d as u64).wrapping_mul(0xD1B5_4A32_D192_ED03),
            );
        }
    }
}

/// A step's micro-batches and the features the VAE's memory holds for them, by position.
type Dealt<B> = (Vec<(usize, Option<Tensor<B, 2>>)>, Vec<Vec<MicroBatch<B>>>);

/// Reads a step's `micro` micro-batches from `source` (counting them in `batches_read`) and
/// deals them round-robin over the replicas' devices, each with its held PTL features.
fn deal<B: AutodiffBackend, H: MoeHost<B>>(
    source: &mut dyn BatchSource<B>,
    vae: Option<&VaeFit<B>>,
    replicas: &Replicas<B, H>,
    micro: usize,
    batches_read: &mut usize,
) -> Result<Dealt<B>, StageError> {
    let mut positions = Vec::with_capacity(micro);
    let mut shards: Vec<Vec<MicroBatch<B>>> = (0..replicas.count()).map(|_| Vec::new()).collect();
    for index in 0..micro {
        let (position, batch) = source.next_batch()?;
        *batches_read = batches_read_after(*batches_read, position, source.len());
        let held = vae.and_then(|fit| fit.memory.get(position));
        positions.push((position, held.clone()));
        let d = index % replicas.count();
        let mut item = MicroBatch {
            index,
            position,
            batch,
            features: held,
        };
        if d > 0
            && let Some(to) = replicas.device(d)
        {
            item = item.to_device(to);
        }
        shards[d].push(item);
    }
    Ok((positions, shards))
}

/// Every device's share of a step put together.
struct Gathered<B: AutodiffBackend> {
    /// Each micro-batch's loss terms, in step order.
    values: Vec<LossValues>,
    /// The PTL features computed for each micro-batch (on the first device), if any.
    computed: Vec<Option<Tensor<B, 2>>>,
    /// Each device's summed gradients of the experts and routers.
    model_grads: Vec<GradientsParams>,
    /// Each device's summed gradients of the VAE.
    vae_grads: Vec<GradientsParams>,
}

/// Puts the devices' `outputs` of a step of `micro` micro-batches together, features moved to
/// `device`; the first error stops the step.
fn gather<B: AutodiffBackend>(
    outputs: Vec<Result<ShardOutput<B>, StageError>>,
    micro: usize,
    device: &B::Device,
) -> Result<Gathered<B>, StageError> {
    let mut gathered = Gathered {
        values: vec![LossValues::default(); micro],
        computed: vec![None; micro],
        model_grads: Vec::with_capacity(outputs.len()),
        vae_grads: Vec::with_capacity(outputs.len()),
    };
    for output in outputs {
        let output = output?;
        for (index, v) in output.values {
            gathered.values[index] = v;
        }
        for (index, features) in output.features {
            gathered.computed[index] = Some(features.to_device(device));
        }
        gathered.model_grads.push(output.model);
        gathered.vae_grads.extend(output.vae);
    }
    Ok(gathered)
}

/// The count of batches of a source's pass order (`len` per pass) used up once the batch at
/// `position` has been read, `read` before it. Usually `read + 1`; more when the source passed
/// over batches it could not load, which a resume must skip as well.
fn batches_read_after(read: usize, position: usize, len: usize) -> usize {
    let len = len.max(1);
    let expected = read % len;
    let pass_start = read - expected;
    if position >= expected {
        pass_start + position + 1
    } else {
        // The source went on into the next pass.
        pass_start + len + position + 1
    }
}

/// One micro-batch of a step, dealt to a device.
struct MicroBatch<B: AutodiffBackend> {
    /// Its index in the step.
    index: usize,
    /// Its position in the pass (for errors and the feature memory).
    position: usize,
    batch: TrainBatch<B>,
    /// Its PTL features, when the feature memory holds them.
    features: Option<Tensor<B, 2>>,
}

impl<B: AutodiffBackend> MicroBatch<B> {
    fn to_device(self, device: &B::Device) -> Self {
        Self {
            batch: self.batch.to_device(device),
            features: self.features.map(|f| f.to_device(device)),
            ..self
        }
    }
}

/// What one device's micro-batches of a step gave.
struct ShardOutput<B: AutodiffBackend> {
    /// Each micro-batch's loss terms, by index in the step.
    values: Vec<(usize, LossValues)>,
    /// PTL features this device computed (the memory did not hold them), by index.
    features: Vec<(usize, Tensor<B, 2>)>,
    /// The experts' and routers' gradients, summed over the micro-batches.
    model: GradientsParams,
    /// The VAE's, when one is fitted.
    vae: Option<GradientsParams>,
}

/// What every device's share of a step needs to know.
struct ShardContext<'a, B: AutodiffBackend> {
    task: usize,
    config: &'a StageConfig,
    micro: usize,
    step: usize,
    lr: f64,
    penalty: Option<&'a dyn Penalty<B>>,
    /// Per MoE layer, per expert: whether the stage trains it.
    trained: &'a [Vec<bool>],
    /// When replicas share a device: the seed of the step's per-micro-batch noise streams
    /// (see [`crate::train::noise`]), so that the draws do not depend on thread timing.
    noise_seed: Option<u64>,
}

impl<B: AutodiffBackend> ShardContext<'_, B> {
    /// Forward and backward passes of `shard`'s micro-batches, one at a time, each on its share
    /// `1 / micro` of the step's loss: `CE + kappa aux` (+ the penalty), plus
    /// `lambda KL + eta rec` when `vae` (with its draws per feature and its feature) is given.
    fn run<H: AutodiffHost<B>>(
        &self,
        model: &CmoeModel<B, H>,
        vae: Option<(&TaskVae<B>, (usize, PtlFeature))>,
        shard: Vec<MicroBatch<B>>,
    ) -> Result<ShardOutput<B>, StageError> {
        let mut model_grads = GradientsAccumulator::<CmoeModel<B, H>>::new();
        let mut vae_grads = GradientsAccumulator::<TaskVae<B>>::new();
        let mut pending: Vec<PendingValues<B::InnerBackend>> = Vec::with_capacity(shard.len());
        let mut computed = Vec::new();
        // PTL's features come from the frozen base alone: an inference copy computes them on
        // another thread while this one runs the training pass (no random draws there, so
        // the result does not depend on the timing).
        let frozen = vae.map(|_| model.valid());
        for item in shard {
            let MicroBatch {
                index,
                position,
                batch,
                features,
            } = item;
            let answers = batch.answers();
            if answers.is_empty() {
                return Err(StageError::NoLabels(position));
            }
            let _stream = self.noise_seed.map(|seed| {
                NoiseStream::install(seed ^ (index as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9))
            });
            let (out, penalty, held, fresh) = std::thread::scope(|scope| {
                let pending = match (&frozen, vae, &features) {
                    (Some(frozen), Some((_, (_, feature))), None) => {
                        let inner = batch.clone().inner();
                        Some(scope.spawn(move || batch_features(frozen, &inner, position, feature)))
                    }
                    _ => None,
                };
                let trained = model.forward_answers(batch.input.clone(), self.task, &answers);
                let fresh =
                    pending.map(|handle| handle.join().expect("the PTL feature pass panicked"));
                let out = trained?;
                let penalty = match self.penalty {
                    Some(penalty) => {
                        Some(penalty.term(&model.moe, &batch, &answers, &out.logits)?)
                    }
                    None => None,
                };
                Ok::<_, StageError>((out, penalty, features, fresh))
            })?;
            let (kl, rec) = match vae {
                Some((vae, (n_rep, _))) => {
                    let features = match (held, fresh) {
                        (Some(features), _) => features,
                        (None, Some(fresh)) => {
                            let features = Tensor::<B, 2>::from_inner(fresh?);
                            computed.push((index, features.clone()));
                            features
                        }
                        (None, None) => unreachable!("features are held or computed"),
                    };
                    let loss = vae.loss(features, n_rep);
                    (Some(loss.kl), Some(loss.rec))
                }
                None => (None, None),
            };
            let ce = answers
                .cross_entropy(out.logits)
                .ok_or(StageError::NoLabels(position))?;
            let layers = out.routing.len().max(1) as f64;
            let selections: Vec<Tensor<B::InnerBackend, 1>> = out
                .routing
                .iter()
                .map(|r| r.selections.clone().inner())
                .collect();
            let aux = out
                .routing
                .into_iter()
                .map(|r| r.aux_loss)
                .reduce(|a, b| a + b)
                .map_or_else(|| ce.zeros_like(), |sum| sum / layers);
            let kl = kl.unwrap_or_else(|| ce.zeros_like());
            let rec = rec.unwrap_or_else(|| ce.zeros_like());
            let penalty = penalty.unwrap_or_else(|| ce.zeros_like());
            let terms = LossTerms::new(ce, kl, rec, aux, penalty, self.config.loss);
            pending.push((index, terms.inner().stacked(), selections));
            // The step's loss is the mean over its micro-batches.
            let total = if self.micro > 1 {
                terms.total / self.micro as f64
            } else {
                terms.total
            };
            let mut grads = total.backward();
            model_grads.accumulate(model, GradientsParams::from_module(&mut grads, model));
            if let Some((vae, _)) = vae {
                vae_grads.accumulate(vae, GradientsParams::from_module(&mut grads, vae));
            }
        }
        // The loss terms and routing counts of every micro-batch, read back in one transfer
        // (a non-finite loss is caught here, before the optimiser steps).
        let values = read_values(pending, self.trained);
        if let Some((_, v)) = values.iter().find(|(_, v)| !v.total.is_finite()) {
            return Err(StageError::NonFinite {
                step: self.step,
                value: v.total,
                lr: self.lr,
            });
        }
        Ok(ShardOutput {
            values,
            features: computed,
            model: model_grads.grads(),
            vae: vae.map(|_| vae_grads.grads()),
        })
    }
}

/// A micro-batch's loss terms ([`LossTerms::stacked`]) and each layer's routing selections,
/// still on the device, by index in the step.
type PendingValues<B> = (usize, Tensor<B, 1>, Vec<Tensor<B, 1>>);

/// Reads `pending` back in one transfer: each micro-batch's loss values, with the share of its
/// routed slots that went to the experts `trained` marks.
fn read_values<B: burn::tensor::backend::Backend>(
    pending: Vec<PendingValues<B>>,
    trained: &[Vec<bool>],
) -> Vec<(usize, LossValues)> {
    let mut parts = Vec::new();
    for (_, terms, selections) in &pending {
        parts.push(terms.clone());
        parts.extend(selections.iter().cloned());
    }
    if parts.is_empty() {
        return Vec::new();
    }
    let read: Vec<f64> = Tensor::cat(parts, 0)
        .into_data()
        .convert::<f64>()
        .into_vec()
        .expect("float values");
    let mut at = 0;
    pending
        .into_iter()
        .map(|(index, _, selections)| {
            let terms = LossValues::from_terms(&read[at..at + 6]);
            at += 6;
            let counts: Vec<Vec<u64>> = selections
                .iter()
                .map(|s| {
                    let [experts] = s.dims();
                    let row = read[at..at + experts]
                        .iter()
                        .map(|&v| v.round() as u64)
                        .collect();
                    at += experts;
                    row
                })
                .collect();
            let v = LossValues {
                trained_share: trained_share(&counts, trained),
                ..terms
            };
            (index, v)
        })
        .collect()
}

/// The share of a batch's routed top-k slots, over every MoE layer, that went to the experts
/// `trained` marks (0 when nothing was routed); `selections[layer][expert]` counts the slots.
fn trained_share(selections: &[Vec<u64>], trained: &[Vec<bool>]) -> f64 {
    let (mut on_trained, mut routed) = (0u64, 0u64);
    for (layer, counts) in selections.iter().enumerate() {
        for (expert, &count) in counts.iter().enumerate() {
            routed += count;
            if trained.get(layer).and_then(|t| t.get(expert)) == Some(&true) {
                on_trained += count;
            }
        }
    }
    if routed == 0 {
        0.0
    } else {
        on_trained as f64 / routed as f64
    }
}

#[cfg(test)]
mod tests {
    use super::{batches_read_after, trained_share};

    #[test]
    fn batches_read_count_the_batches_a_source_passed_over() {
        // Passes of 3 batches, read one after another.
        assert_eq!(batches_read_after(0, 0, 3), 1);
        assert_eq!(batches_read_after(2, 2, 3), 3);
        assert_eq!(batches_read_after(3, 0, 3), 4);
        // Position 1 could not be loaded: asked for the 2nd batch, the source gave position 2.
        assert_eq!(batches_read_after(1, 2, 3), 3);
        // Position 2 could not be loaded: the source went on to the next pass's first batch.
        assert_eq!(batches_read_after(2, 0, 3), 4);
        assert_eq!(batches_read_after(5, 1, 3), 8);
        // One batch per pass.
        assert_eq!(batches_read_after(4, 0, 1), 5);
    }

    #[test]
    fn trained_share_counts_the_slots_routed_to_trained_experts_over_all_layers() {
        // Layer 0: 10 slots, 3 on its new expert; layer 1 has no new expert: 10 more slots.
        let selections = [vec![4, 3, 3], vec![6, 4]];
        let trained = [vec![false, false, true], vec![false, false]];
        assert_eq!(trained_share(&selections, &trained), 3.0 / 20.0);
        assert_eq!(trained_share(&selections[..1], &[vec![true; 3]]), 1.0);
        assert_eq!(trained_share(&[], &[]), 0.0);
    }
}
